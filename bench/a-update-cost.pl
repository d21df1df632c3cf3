#!/usr/bin/env perl
# Bench (a): cost per update inside nginx, LuaJIT compiling the loop.
#
# One nginx (1 worker, so every request lands in the same LuaJIT VM) runs,
# per request, one loop of N iterations of one variant (bench/lua/
# shmprom_bench/update.lua). Rounds alternate the variants (rotated order);
# per round every variant's ns/op has the same round's empty loop taken
# off, and is divided by the same round's Lua table update; medians over
# the rounds are reported. A first pass per variant runs under LuaJIT's
# profiler and trace hook to show the loop is compiled.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head $REPO $QUICK $PEER free_ports nginx_start
             nginx_stop http_get http_get_json median minmax fmt_num md_table
             write_fragment spew logmsg add_target $OUT);

my $N = $ENV{BENCH_A_N} || ($QUICK ? 2_000_000 : 10_000_000);
my $ROUNDS = $ENV{BENCH_A_ROUNDS} || ($QUICK ? 3 : 7);
my $CHECK_N = $N;

my ($port) = free_ports(1);
my $peer_http = $PEER ? 'lua_shared_dict peer_metrics 64m;' : '';
my $peer_init = $PEER ? <<'EOL' : '';
        do
            local prom = require("prometheus").init("peer_metrics")
            peer_prom = prom
            U.objs.peer = {
                counter = prom:counter("peer_a_counter_total", "2 labels",
                                       { "method", "status" }),
                counter2 = prom:counter("peer_a_counter_newtable_total",
                                        "2 labels", { "method", "status" }),
                gauge = prom:gauge("peer_a_gauge", "2 labels",
                                   { "method", "status" }),
                hist = prom:histogram("peer_a_seconds", "1 label, 15 buckets",
                                      { "op" }, U.BUCKETS15),
            }
        end
EOL

my $conf = conf_head(workers => 1, conns => 256, temp => 1) . <<"EOC";
    $peer_http

    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local U = require "shmprom_bench.update"
        local m = shmprom.new{ zone = "bench_a", size = "16m" }
        bench_m = m
        U.objs.shmprom = {
            counter = m:counter("bench_a_counter_total", "2 labels",
                                { "method", "status" }),
            counter2 = m:counter("bench_a_counter_newtable_total", "2 labels",
                                 { "method", "status" }),
            handle_family = m:counter("bench_a_handle_total", "2 labels",
                                      { "method", "status" }),
            gauge = m:gauge("bench_a_gauge", "2 labels", { "method", "status" }),
            hist = m:histogram("bench_a_seconds", "1 label, 15 buckets",
                               { "op" }, U.BUCKETS15),
        }
    }
    init_worker_by_lua_block {
        local U = require "shmprom_bench.update"
        bench_m:init_worker()
        local o = U.objs.shmprom
        o.handles = {}
        for i = 1, 8 do
            o.handles[i] = assert(o.handle_family:labels(unpack(U.LV2[i])))
        end
$peer_init
    }

    server {
        listen 127.0.0.1:$port;
        location = /run {
            content_by_lua_block {
                local U = require "shmprom_bench.update"
                local J = require "shmprom_bench.json"
                local a = ngx.var.arg_check and U.check or U.run
                local r, err = a(ngx.var.arg_v, tonumber(ngx.var.arg_n),
                                 ngx.var.arg_lib)
                if not r then
                    ngx.status = 400
                    ngx.say(err)
                    return
                end
                ngx.say(J.encode(r))
            }
        }
        location = /info {
            content_by_lua_block {
                local U = require "shmprom_bench.update"
                ngx.say(require("shmprom_bench.json").encode(U.info()))
            }
        }
        location = /metrics {
            content_by_lua_block { bench_m:collect() }
        }
    }
}
EOC

my $nx = nginx_start(name => 'a-update', conf => $conf, ready => "http://127.0.0.1:$port/info",
                     workers => 1);
my $info = http_get_json("http://127.0.0.1:$port/info");
spew("$OUT/luajit.txt", "$info->{version} (jit.status: $info->{on}; $info->{flags})\n");
logmsg "LuaJIT $info->{version}, jit on=$info->{on}";

my @variants = qw(empty table counter counter_newtable handle gauge histogram);
my @items = map { [ 'shmprom', $_ ] } @variants;
push @items, [ 'diagnostic', 'diag_linear' ], [ 'diagnostic', 'diag_bisect' ], [ 'diagnostic', 'diag_binary' ];
push @items, map { [ 'peer', $_ ] } qw(counter counter_newtable gauge histogram) if $PEER;

my %label = (
    empty => 'empty loop',
    table => 'Lua table update',
    counter => 'counter inc, 2 labels',
    counter_newtable => 'counter inc, 2 labels, new {a, b} table per call',
    handle => 'counter inc through a labels() handle',
    gauge => 'gauge set, 2 labels',
    histogram => 'histogram observe, 1 label, 15 buckets',
    diag_linear => 'bucket search alone, linear scan of a Lua table (the wrapper before b11d254) + 2 cell adds',
    diag_bisect => 'bucket search alone, bisection in a while loop over a Lua table (the wrapper from b11d254 to 291cca4) + 2 cell adds',
    diag_binary => 'bucket search alone, bisection unrolled (4 fixed steps) over an FFI double[16] (the shape of the wrapper since 291cca4) + 2 cell adds',
);
my %body = (
    empty => 'for _ = 1, n do end',
    table => 'local k = K[band(i, 7) + 1]; t[k] = t[k] + 1',
    counter => 'c:inc(1, L[band(i, 7) + 1])',
    counter_newtable => 'c:inc(1, { A[band(i, 3) + 1], B[band(i, 1) + 1] })',
    handle => 'H[band(i, 7) + 1]:inc(1)',
    gauge => 'g:set(i, L[band(i, 7) + 1])',
    histogram => 'h:observe(X[band(i, 7) + 1], L1[band(i, 3) + 1])',
    diag_linear => 'for j = 1, nb do if v <= b[j] then k = j - 1 break end end; c[k] = c[k] + 1; c[17] = c[17] + v',
    diag_bisect => 'while lo < hi do local mid = rshift(lo + hi, 1); if v <= b[mid] then hi = mid else lo = mid + 1 end end; ...',
    diag_binary => '4 x if v > B[k + m] then k = k + 2m end; c[k] = c[k] + 1; c[17] = c[17] + v',
);

my $url = sub {
    my ($lib, $v, $n, $check) = @_;
    $lib = 'shmprom' if $lib eq 'diagnostic';
    return "http://127.0.0.1:$port/run?lib=$lib&v=$v&n=$n" . ($check ? '&check=1' : '');
};

# pass 1: compiled? (also the warm-up: the traces are recorded here)
my %jit;
for my $it (@items) {
    my ($lib, $v) = @$it;
    $jit{"$lib/$v"} = http_get_json($url->($lib, $v, $CHECK_N, 1), 120);
}

# timed rounds
my %cpu;     # "lib/v" => [ns/op per round]
my %wall;
my %total_n;
$total_n{$_} = $CHECK_N for map { "$_->[0]/$_->[1]" } @items;
for my $r (0 .. $ROUNDS - 1) {
    my @order = (@items[$r % @items .. $#items], @items[0 .. $r % @items - 1]);
    for my $it (@order) {
        my ($lib, $v) = @$it;
        my $res = http_get_json($url->($lib, $v, $N), 300);
        push @{ $cpu{"$lib/$v"} }, $res->{cpu_ns} / $N;
        push @{ $wall{"$lib/$v"} }, $res->{wall_ns} / $N;
        $total_n{"$lib/$v"} += $N;
    }
    logmsg "(a) round " . ($r + 1) . "/$ROUNDS done";
}

# the counters must hold every increment
my ($mcode, undef, undef, $metrics) = http_get("http://127.0.0.1:$port/metrics", 30);
spew("$Bench::WORK/a-metrics.txt", $metrics);
my %sum;
for my $line (split /\n/, $metrics) {
    next unless $line =~ /^(bench_a_(?:counter|counter_newtable|handle)_total)\{[^}]*\} (\S+)$/;
    $sum{$1} += $2;
}
my @verify;
for ([ counter => 'bench_a_counter_total' ], [ counter_newtable => 'bench_a_counter_newtable_total' ],
     [ handle => 'bench_a_handle_total' ]) {
    my ($v, $fam) = @$_;
    my $want = $total_n{"shmprom/$v"};
    push @verify, sprintf('%s = %s (expected %s: %s)', $fam, $sum{$fam} // 0, $want,
                          ($sum{$fam} // 0) == $want ? 'exact' : 'MISMATCH');
}
nginx_stop($nx);

# per-round net cost and ratio, then medians
my %net;
my %ratio;
for my $it (@items) {
    my $k = "$it->[0]/$it->[1]";
    for my $r (0 .. $ROUNDS - 1) {
        my $e = $cpu{'shmprom/empty'}[$r];
        my $t = $cpu{'shmprom/table'}[$r] - $e;
        my $x = $cpu{$k}[$r] - $e;
        push @{ $net{$k} }, $x;
        push @{ $ratio{$k} }, $t > 0 ? $x / $t : undef;
    }
}

my %target = (counter => '<= 10 ns', histogram => '<= 30 ns');
my %anchor = (counter => '16-17 ns', counter_newtable => '16-17 ns', histogram => '432-446 ns',
              gauge => '285-326 ns (dict write)');

sub jit_cell {
    my ($j) = @_;
    my $s = ref $j->{samples} eq 'HASH' ? $j->{samples} : {};
    my $tot = 0;
    $tot += $_ for values %$s;
    my $pct = $tot ? sprintf('%.0f%% compiled', 100 * ($s->{N} // 0) / $tot) : 'too short to sample';
    my $other = join ' ', map { "$_=" . $s->{$_} } grep { $_ ne 'N' } sort keys %$s;
    $pct .= " ($other)" if $other;
    my $ab = $j->{aborts} ? "; $j->{aborts} aborts: " . join('; ', @{ $j->{abort_reasons} }[0 .. ($j->{aborts} > 2 ? 2 : $j->{aborts} - 1)]) : '';
    return "$pct; $j->{traces} traces, $j->{loops} loop" . $ab;
}

my @rows;
my %met;
for my $it (@items) {
    my ($lib, $v) = @$it;
    my $k = "$lib/$v";
    my $med = median(@{ $net{$k} });
    my ($lo, $hi) = minmax(@{ $net{$k} });
    my $raw = median(@{ $cpu{$k} });
    my $w = median(@{ $wall{$k} });
    my $rat = median(@{ $ratio{$k} });
    my $t = $lib eq 'shmprom' ? ($target{$v} // '') : '';
    if ($t && $t =~ /<= (\d+)/) {
        my $lim = $1;
        my $verdict = $med <= $lim ? 'met' : sprintf('MISSED by %s ns (%.0f%%)', fmt_num($med - $lim),
                                                       100 * ($med - $lim) / $lim);
        $t .= " ($verdict)";
        add_target("a-$v", "(a) $label{$v}: net ns/op in a compiled loop", "<= $lim ns",
                   sprintf('%s ns (%.1fx the Lua table update of %s ns)', fmt_num($med), $rat,
                           fmt_num(median(@{ $net{'shmprom/table'} }))), $verdict);
    }
    push @rows, [ $lib, $label{$v}, "`$body{$v}`", fmt_num($raw), fmt_num($w),
                  $v eq 'empty' ? '-' : fmt_num($med),
                  $v eq 'empty' ? '' : fmt_num($lo) . ' .. ' . fmt_num($hi),
                  ($v eq 'empty') ? '-' : sprintf('%.2f', $rat),
                  $t, jit_cell($jit{$k}) ];
}

my $md = "## (a) Cost per update inside nginx (LuaJIT compiling the loop)\n\n";
$md .= "Command: one nginx, 1 worker, $info->{version} (jit.status: $info->{on}, "
     . "flags: $info->{flags}); per variant and round "
     . "`curl 'http://127.0.0.1:PORT/run?lib=shmprom&v=VARIANT&n=$N'` runs the loop of "
     . "bench/lua/shmprom_bench/update.lua (`for i = 1, n do BODY end`, label values from "
     . "prebuilt tables held in locals: 8 sets of 2 values, 4 sets of 1 value) between two "
     . "`clock_gettime(CLOCK_THREAD_CPUTIME_ID)` reads. $ROUNDS rounds, variants in a rotated "
     . "order each round. **net ns/op** = variant minus the same round's empty loop, median "
     . "over rounds; **ratio** = net / net of the Lua table update of the same round "
     . "(median of the per-round ratios). Baselines (empty loop, table update) measured in "
     . "the same run.\n\n";
$md .= md_table([ 'lib', 'update', 'loop body', 'raw ns/op (CPU)', 'raw ns/op (wall)',
                  'net ns/op', 'net range', 'ratio vs table', 'target', 'JIT check' ], @rows);
$md .= "\nJIT check: a first pass of " . fmt_num($CHECK_N) . " iterations per variant runs under "
     . "`jit.profile` (1 ms samples by VM state: N = compiled code, I = interpreter, "
     . "C = C function, G = GC, J = trace compiler) and a `jit.attach` trace hook "
     . "(traces completed, of them looping traces, aborts). An abort such as \"leaving loop in "
     . "root trace\" is LuaJIT retrying a trace from a better start; what matters is the share "
     . "of samples in compiled code.\n\n"
     . "The `diagnostic` rows are not the API: they time the histogram's bucket search "
     . "alone (same 15 buckets, same 8 rotating values, two cell adds) in three shapes, to show "
     . "where the histogram's time goes. The handle row "
     . "rotates 8 handle objects, so LuaJIT cannot hoist the per-handle field loads out of the "
     . "loop, whereas `c:inc` keeps one family object that it can.\n\n";
$md .= "Every increment was counted: " . join('; ', @verify) . ".\n\n";
unless ($PEER) {
    $md .= "Peer figures (nginx-lua-prometheus 0.20240525) **taken from "
         . "../shared/docs/anchors.md, not measured here**: counter inc "
         . "$anchor{counter} (a worker-local Lua table add, synced to the dict every second), "
         . "histogram observe $anchor{histogram}; with direct dict writes 285-326 ns / about "
         . "7 us. Set PEER_LUA_PATH to measure it side by side.\n\n";
}
write_fragment('a', $md);
