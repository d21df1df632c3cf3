#!/usr/bin/env perl
# Bench (f): creating 10k new label sets under load; the longest stall of
# any worker.
#
# One nginx (2 workers). Every request to /p/<id> records, in log_by_lua,
# a counter {path, status} and a histogram {path} (19 buckets) through
# labels() handles cached per path. A stall detector in each worker (a 1 ms
# ngx.timer.every, bench/lua/shmprom_bench/stall.lua) records the longest
# gap between its ticks during each run. Modes, alternating:
#   old    wrk cycles over 10k paths whose series exist (baseline)
#   new    the same, but each wrk thread first sends 5k paths never seen: 10k
#          new label sets (10k counter + 10k histogram series) created by
#          the traffic at the start of the run
#   batch  the old load, plus one request that creates 10k new histogram
#          label sets in one loop (the worker running it is blocked for the
#          loop: that is its stall); the zone has the default prefault
#          ("table": its slot array resident from the start)
#   batch-plain, batch-prefault
#          the same loop, into one of two more 512m zones of the same nginx
#          that differ only in prefault (false / true: the whole zone
#          resident from the master, mapped by each worker's init_worker);
#          both get the same 10k old
#          label sets first and then only these batches, so the pair
#          measures prefault alone (the batch row's zone also takes the
#          traffic's label sets, and its workers' label caches differ)
#   batch-small
#          the same loop into a fourth zone, prefault = true, sized for the
#          label sets it will hold (the 10k old ones and one batch a round,
#          with a fifth to spare): its table's slot array is 1-2 MiB
#          instead of 113 MiB, so the loop's slot reads stay in cache and
#          TLB; not judged: what a table sized to its live series (instead
#          of to the zone's capacity) would take off the batch
#   batch-sliced
#          the batch loop into the first zone in 10 slices of 1,000 label
#          sets with ngx.sleep(0.001) between them, as README.md advises
#          for code that must create many label sets at once; not judged:
#          what slicing bounds the stall to, and what it costs in time
#   batch-bare
#          the same loop with no metrics library: each label set's string
#          and table built the same way, the string put into a per-worker
#          Lua table (as a label cache does); not judged, the floor under
#          any Lua library's batch on this machine
# With PEER_LUA_PATH, a second nginx runs the peer (nginx-lua-prometheus)
# with the same metrics, recorded the peer's way (no handles: the label
# values as a table per call), through old, new and batch.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head $REPO $WORK $QUICK $PEER free_ports nginx_start
             nginx_stop http_get http_get_json wrk_run median minmax fmt_num
             md_table write_fragment spew slurp logmsg spawn_child
             wait_child add_target stall_locations wait_for_conns $OUT);
use Time::HiRes qw(time sleep);

my $STALL_LOCATIONS = stall_locations();

my $SECS = $ENV{BENCH_SECS} || ($QUICK ? 3 : 6);
my $ROUNDS = $ENV{BENCH_ROUNDS} || ($QUICK ? 3 : 5);
my @MODES = qw(old new batch batch-plain batch-prefault batch-small batch-sliced batch-bare);
# batch-sliced: label sets per slice
my $SLICE = 1_000;
my $NEW = 10_000;
my $TARGET = 10;    # ms
# batch-small's zone: room for the 10k old counter and histogram label sets
# and one batch a round, a fifth to spare. With cells_per_series = 21 and 3
# planes (2 workers and the shared one) the zone budgets 551 bytes per
# series, 16/15 of that per series its table takes (Layout::compute_for)
my $SMALL_MB = int((($ROUNDS + 2) * $NEW * 551 * 16 / 15 * 1.2) / (1 << 20)) + 1;
$SMALL_MB = 16 if $SMALL_MB < 16;
# a larger one by hand: BENCH_F_SMALL_MB=136 (a 4 MiB slot array)
$SMALL_MB = $1 if ($ENV{BENCH_F_SMALL_MB} // '') =~ /^(\d+)$/ && $1 > $SMALL_MB;

my ($port, $cport) = free_ports(2);
my $conf = conf_head(workers => 2, conns => 1024) . <<"EOC";
    lua_shared_dict stall 1m;
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        bench_m = shmprom.new{ zone = "bench_f", size = "512m" }
        bench_c, bench_h = F.families(bench_m, "bench_f", "path")
        bench_q = shmprom.new{ zone = "bench_f_plain", size = "512m", prefault = false }
        bench_qc, bench_qh = F.families(bench_q, "bench_f", "path")
        bench_s = shmprom.new{ zone = "bench_f_small", size = "${SMALL_MB}m", prefault = true,
                               cells_per_series = 21 }
        bench_sc, bench_sh = F.families(bench_s, "bench_f", "path")
        local t0 = F.mono_ns()
        bench_p = shmprom.new{ zone = "bench_f_pf", size = "512m", prefault = true }
        bench_pf_ms = (F.mono_ns() - t0) / 1e6
        bench_pc, bench_ph = F.families(bench_p, "bench_f", "path")
        by_path = {}
    }
    init_worker_by_lua_block {
        bench_m:init_worker()
        bench_q:init_worker()
        bench_s:init_worker()
        local F = require "shmprom_bench.fill"
        local t0 = F.mono_ns()
        bench_p:init_worker()
        ngx.shared.stall:set("pf_map_ms:" .. ngx.worker.id(), (F.mono_ns() - t0) / 1e6)
        require("shmprom_bench.stall").start("stall", 0.001)
    }
    server {
        listen 127.0.0.1:$port;
        location /p/ {
            return 200 "hello\\n";
            log_by_lua_block {
                local path = ngx.var.uri
                local s = by_path[path]
                if not s then
                    s = { c = bench_c:labels(path, ngx.status),
                          h = bench_h:labels(path) }
                    by_path[path] = s
                end
                s.c:inc(1)
                s.h:observe(ngx.now() - ngx.req.start_time())
            }
        }
    }
    server {
        listen 127.0.0.1:$cport;
$STALL_LOCATIONS
        location = /batch {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local base, n = tonumber(ngx.var.arg_base), tonumber(ngx.var.arg_n)
                local h = ({ pf = bench_ph, plain = bench_qh, small = bench_sh })[ngx.var.arg_zone or ""]
                          or bench_h
                local t0 = F.mono_ns()
                -- the CPU time and page faults of the loop's own stretches:
                -- between two slices the worker serves other requests on
                -- the same clocks (nil faults: not counted here)
                local failed, cpu, faults = 0, 0, 0
                local function timed(fn, ...)
                    local c1, f1 = F.cpu_ns(), F.thread_faults()
                    fn(...)
                    cpu = cpu + (F.cpu_ns() - c1)
                    faults = faults and f1 and faults + (F.thread_faults() - f1)
                end
                if ngx.var.arg_zone == "bare" then
                    timed(F.bare_batch, base, n)
                else
                    -- in slices of arg_slice label sets with 1 ms pauses
                    -- between (batch-sliced), else in one
                    local slice = tonumber(ngx.var.arg_slice) or n
                    local last = base + n - 1
                    local function run(first)
                        for i = first, math.min(first + slice - 1, last) do
                            local ok = h:observe(0.01, { "/b/" .. i })
                            if not ok then failed = failed + 1 end
                        end
                    end
                    for first = base, last, slice do
                        if first > base then
                            ngx.sleep(0.001)
                        end
                        timed(run, first)
                    end
                end
                local ms = (F.mono_ns() - t0) / 1e6
                ngx.say(require("shmprom_bench.json").encode({ ms = ms,
                    cpu_ms = cpu / 1e6, faults = faults or -1,
                    failed = failed, worker = ngx.worker.id() }))
            }
        }
        # the plain, prefault and small zones get the 10k old label sets the
        # warm-up gives the first zone; tells what prefaulting cost
        location = /pf/warm {
            content_by_lua_block {
                for i = 1, 10000 do
                    local path = "/p/" .. i
                    assert(bench_qc:inc(1, { path, 200 }))
                    assert(bench_qh:observe(0.001, { path }))
                    assert(bench_pc:inc(1, { path, 200 }))
                    assert(bench_ph:observe(0.001, { path }))
                    assert(bench_sc:inc(1, { path, 200 }))
                    assert(bench_sh:observe(0.001, { path }))
                end
                local d = ngx.shared.stall
                ngx.say(require("shmprom_bench.json").encode({
                    how = bench_p.prefault, master_ms = bench_pf_ms,
                    map_ms = { d:get("pf_map_ms:0"), d:get("pf_map_ms:1") } }))
            }
        }
        location = /metrics { content_by_lua_block { bench_m:collect() } }
        location = /pf/metrics { content_by_lua_block { bench_p:collect() } }
        location = /plain/metrics { content_by_lua_block { bench_q:collect() } }
        location = /small/metrics { content_by_lua_block { bench_s:collect() } }
    }
}
EOC

my $nx = nginx_start(name => 'f-new-series', conf => $conf, ready => "http://127.0.0.1:$cport/metrics",
                     workers => 2);
my $script = "$FindBin::Bin/wrk/paths.lua";
my $url = "http://127.0.0.1:$port/";
# warm-up: the 10k old paths exist in the zone and in both workers' caches
wrk_run(url => $url, threads => 2, conns => 50, secs => $QUICK ? 2 : 3, script => $script, args => ['old']);
my $pf = http_get_json("http://127.0.0.1:$cport/pf/warm", 60);
die "the prefault zone was not prefaulted\n" unless $pf && $pf->{how};
logmsg sprintf('(f) prefault zone: %s, %.0f ms in the master, %s ms per worker (init_worker)',
               $pf->{how}, $pf->{master_ms}, join('/', map { sprintf '%.0f', $_ // -1 } @{ $pf->{map_ms} }));
sleep 0.5;

# run_rounds(lib, port, cport, batch_query, modes...) -> { mode => [ per round ] }
# $ROUNDS rounds, the modes in a rotated order each round; batch_query(mode)
# gives the batch request's extra query string
my $gen = 0;
sub run_rounds {
    my ($lib, $port, $cport, $batch_query, @modes) = @_;
    my $url = "http://127.0.0.1:$port/";
    my %runs;
    for my $r (0 .. $ROUNDS - 1) {
        my @order = (@modes[$r % @modes .. $#modes], @modes[0 .. $r % @modes - 1]);
        for my $mode (@order) {
            $gen++;
            http_get("http://127.0.0.1:$cport/stall/reset", 5);
            sleep 0.05;
            my @args = $mode eq 'new' ? ('new', 1_000_000 * $gen, $NEW / 2) : ('old');
            my $batch_pid;
            my $bfile = "$WORK/f-batch-$gen.json";
            my $batch = $mode =~ /^batch/;
            if ($batch) {
                my $base = 1_000_000 * $gen;
                my $q = $batch_query->($mode);
                $batch_pid = spawn_child('batch', sub {
                    # under load: wrk's 50 connections open, and a second in
                    wait_for_conns($cport, 51, 10);
                    sleep 1;
                    http_get("http://127.0.0.1:$cport/batch?base=$base&n=$NEW$q", 60, $bfile);
                });
            }
            my $res = wrk_run(url => $url, threads => 2, conns => 50, secs => $SECS, latency => 1,
                              script => $script, args => \@args);
            if ($batch_pid) {
                # the batch request ends long before wrk (the peer's too);
                # bounded wait anyway
                wait_child($batch_pid, 60);
            }
            my $stall = http_get_json("http://127.0.0.1:$cport/stall/read", 5);
            my ($wmax) = sort { $b <=> $a } @{ $stall->{wall} };
            my ($cmax) = sort { $b <=> $a } @{ $stall->{cpu} };
            my %rec = (wrk => $res, stall => $stall, wall_max => $wmax, cpu_max => $cmax);
            if ($batch) {
                my $bd = eval { JSON::PP->new->decode(slurp($bfile) // '') };
                die "$lib batch request gave no answer\n" unless $bd;
                die "$lib batch: $bd->{failed} refused\n" if $bd->{failed};
                $rec{batch_ms} = $bd->{ms};
                $rec{batch_cpu_ms} = $bd->{cpu_ms};
                $rec{batch_worker} = $bd->{worker};
                $rec{batch_faults} = $bd->{faults};
                # the other worker: the stall the batch did not run in
                my @others = grep { $_ != $bd->{worker} } 0 .. $#{ $stall->{cpu} };
                ($rec{other_cpu}) = sort { $b <=> $a } map { $stall->{cpu}[$_] } @others;
            }
            $runs{$mode}[$r] = \%rec;
            logmsg sprintf('(f) %s round %d %-14s %8.0f req/s p99 %.2f ms max %.1f ms; stall wall %s ms, '
                           . 'busy %s ms%s',
                           $lib, $r + 1, $mode, $res->{rps}, 1000 * $res->{p99}, 1000 * $res->{max},
                           join('/', map { sprintf '%.1f', $_ } @{ $stall->{wall} }),
                           join('/', map { sprintf '%.1f', $_ } @{ $stall->{cpu} }),
                           $batch ? sprintf('; batch loop %.1f ms (CPU %.1f ms, %d page faults) in worker %d',
                                            $rec{batch_ms}, $rec{batch_cpu_ms}, $rec{batch_faults},
                                            $rec{batch_worker}) : '');
        }
    }
    return \%runs;
}
my %runs = %{ run_rounds('shmprom', $port, $cport,
                         sub { { 'batch-prefault' => '&zone=pf', 'batch-plain' => '&zone=plain',
                                 'batch-small' => '&zone=small', 'batch-sliced' => "&slice=$SLICE",
                                 'batch-bare' => '&zone=bare' }->{ $_[0] } // '' },
                         @MODES) };
# every new label set went in
my (undef, undef, undef, $m) = http_get("http://127.0.0.1:$cport/metrics", 60);
my ($series_c) = $m =~ /^shmprom_series\{family="bench_f_requests_total"\} (\S+)$/m;
my ($series_h) = $m =~ /^shmprom_series\{family="bench_f_duration_seconds"\} (\S+)$/m;
# the slot arrays' sizes of the other zones, MiB (16-byte slots, capacity
# 15/16 of them)
my %slots_mib;
my ($dropped) = 0;
$dropped += $1 while $m =~ /^shmprom_series_dropped_total\{family="bench_f_[^"]+"\} (\S+)$/mg;
my %series2;
for my $z (qw(plain pf small)) {
    (undef, undef, undef, $m) = http_get("http://127.0.0.1:$cport/$z/metrics", 60);
    ($series2{$z}) = $m =~ /^shmprom_series\{family="bench_f_duration_seconds"\} (\S+)$/m;
    ($slots_mib{$z}) = map { $_ * 16 / 15 * 16 / (1 << 20) } $m =~ /^shmprom_series_capacity (\S+)$/m;
    $dropped += $1 while $m =~ /^shmprom_series_dropped_total\{family="bench_f_[^"]+"\} (\S+)$/mg;
}
nginx_stop($nx);

# The peer side by side: the same load, label sets and stall detector, the
# peer's own way of recording (no handles: a label table per call; its
# counters sync to the dict every second). Its dict is sized so that
# nothing is evicted (its error metric is read at the end).
my (%peer_runs, $peer_errors, $peer_free);
my @PEER_MODES = qw(old new batch);
if ($PEER) {
    my ($pport, $pcport) = free_ports(2);
    my $pconf = conf_head(workers => 2, conns => 1024) . <<"EOC";
    lua_shared_dict stall 1m;
    lua_shared_dict peer_f 1024m;
    init_worker_by_lua_block {
        local F = require "shmprom_bench.fill"
        peer_prom = require("prometheus").init("peer_f")
        peer_c, peer_h = F.families(peer_prom, "bench_f", "path")
        require("shmprom_bench.stall").start("stall", 0.001)
    }
    server {
        listen 127.0.0.1:$pport;
        location /p/ {
            return 200 "hello\\n";
            log_by_lua_block {
                local path = ngx.var.uri
                peer_c:inc(1, { path, ngx.status })
                peer_h:observe(ngx.now() - ngx.req.start_time(), { path })
            }
        }
    }
    server {
        listen 127.0.0.1:$pcport;
$STALL_LOCATIONS
        location = /batch {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local base, n = tonumber(ngx.var.arg_base), tonumber(ngx.var.arg_n)
                local h = peer_h
                local t0, c0, f0 = F.mono_ns(), F.cpu_ns(), F.thread_faults()
                for i = base, base + n - 1 do
                    h:observe(0.01, { "/b/" .. i })
                end
                local ms = (F.mono_ns() - t0) / 1e6
                local cpu_ms = (F.cpu_ns() - c0) / 1e6
                local f1 = F.thread_faults()
                ngx.say(require("shmprom_bench.json").encode({ ms = ms,
                    cpu_ms = cpu_ms, faults = f0 and f1 and f1 - f0 or -1,
                    failed = 0, worker = ngx.worker.id() }))
            }
        }
        # the peer's error metric (dict full, evictions) and the dict's
        # free pages, read from the dict itself (a scrape of millions of
        # keys would take minutes)
        location = /peer/state {
            content_by_lua_block {
                local d = ngx.shared.peer_f
                ngx.say(require("shmprom_bench.json").encode({
                    errors = d:get("nginx_metric_errors_total") or 0,
                    free = d:free_space() }))
            }
        }
    }
}
EOC
    my $pnx = nginx_start(name => 'f-peer', conf => $pconf, ready => "http://127.0.0.1:$pcport/peer/state",
                          workers => 2);
    # warm-up: the 10k old paths' label sets exist
    wrk_run(url => "http://127.0.0.1:$pport/", threads => 2, conns => 50, secs => $QUICK ? 2 : 3,
            script => $script, args => ['old']);
    %peer_runs = %{ run_rounds('peer', $pport, $pcport, sub { '' }, @PEER_MODES) };
    my $st = http_get_json("http://127.0.0.1:$pcport/peer/state", 10);
    ($peer_errors, $peer_free) = ($st->{errors}, $st->{free});
    logmsg "(f) peer: error metric $peer_errors, dict free $peer_free bytes";
    nginx_stop($pnx);
}

# row(runs, mode, target?) -> (table row, busy median, busy worst, wall worst)
sub row {
    my ($runs, $mode, $judge) = @_;
    my @rs = @{ $runs->{$mode} };
    my (@rr, @pr);
    for my $r (0 .. $ROUNDS - 1) {
        my $b = $runs->{old}[$r]{wrk};
        push @rr, $rs[$r]{wrk}{rps} / $b->{rps};
        push @pr, $rs[$r]{wrk}{p99} / $b->{p99};
    }
    my $busy_med = median(map { $_->{cpu_max} } @rs);
    my (undef, $busy_worst) = minmax(map { $_->{cpu_max} } @rs);
    my $wall_med = median(map { $_->{wall_max} } @rs);
    my (undef, $wall_worst) = minmax(map { $_->{wall_max} } @rs);
    my $target = '';
    if ($judge && $mode !~ /^(old|batch-bare|batch-small|batch-sliced)$/) {
        $target = "<= $TARGET ms (median of runs): " . ($busy_med <= $TARGET ? 'met'
            : sprintf('MISSED by %.1f ms', $busy_med - $TARGET));
    }
    my $row = [ $mode, fmt_num(median(map { $_->{wrk}{rps} } @rs)),
                $mode eq 'old' ? '1 (baseline)' : sprintf('%.3f', median(@rr)),
                sprintf('%.2f', 1000 * median(map { $_->{wrk}{p99} } @rs)),
                $mode eq 'old' ? '1 (baseline)' : sprintf('%.2f', median(@pr)),
                sprintf('%.1f', 1000 * median(map { $_->{wrk}{max} } @rs)),
                sprintf('%.1f / %.1f', $busy_med, $busy_worst),
                sprintf('%.1f / %.1f', $wall_med, $wall_worst),
                $mode =~ /^batch/ ? sprintf('loop %.1f ms wall, %.1f ms CPU (%.2f us CPU per label set), '
                                           . '%d page faults; other worker busy %.1f ms',
                                           median(map { $_->{batch_ms} } @rs),
                                           median(map { $_->{batch_cpu_ms} } @rs),
                                           1000 * median(map { $_->{batch_cpu_ms} } @rs) / $NEW,
                                           median(map { $_->{batch_faults} } @rs),
                                           median(map { $_->{other_cpu} } @rs)) : '' ];
    push @$row, $target if $judge;
    return ($row, $busy_med, $busy_worst, $wall_worst);
}

my @rows;
my %summary;
for my $mode (@MODES) {
    my @rs = @{ $runs{$mode} };
    my ($row, $busy_med, $busy_worst, $wall_worst) = row(\%runs, $mode, 1);
    push @rows, $row;
    if ($mode !~ /^(old|batch-plain|batch-bare|batch-small|batch-sliced)$/) {
        my @base = map { $_->{cpu_max} } @{ $runs{old} };
        my (undef, $base_worst) = minmax(@base);
        add_target("f-$mode", $mode eq 'new'
                       ? '(f) 10k new label sets created by the traffic under load: longest worker stall'
                       : $mode eq 'batch'
                       ? '(f) 10k new histogram label sets created in one handler loop under load (default zone: prefault = "table"): longest worker stall'
                       : '(f) the same loop into a zone opened with prefault = true: longest worker stall (the same into a zone with prefault = false: ' . sprintf('%.1f ms', median(map { $_->{cpu_max} } @{ $runs{'batch-plain'} })) . ')',
                   "<= $TARGET ms",
                   sprintf('%.1f ms busy, median of %d runs (worst run %.1f; no-creation baseline %.1f, '
                           . 'worst %.1f; wall gaps up to %.1f ms, preemption included)', $busy_med, $ROUNDS,
                           $busy_worst, median(@base), $base_worst, $wall_worst),
                   $busy_med <= $TARGET ? 'met' : sprintf('MISSED by %.1f ms', $busy_med - $TARGET));
    }
    $summary{"$mode busy_median"} = $busy_med;
    $summary{"$mode busy_worst"} = $busy_worst;
    $summary{"$mode wall_worst"} = $wall_worst;
    $summary{"$mode batch_ms"} = median(map { $_->{batch_ms} } @rs) if $mode =~ /^batch/;
}
# prefault against the same zone without, round by round (the two batches
# of a round ran a few seconds apart under the same load)
my @pf_ratio = map { $runs{'batch-prefault'}[$_]{cpu_max} / $runs{'batch-plain'}[$_]{cpu_max} } 0 .. $ROUNDS - 1;
my @pf_loop_ratio = map { $runs{'batch-prefault'}[$_]{batch_cpu_ms} / $runs{'batch-plain'}[$_]{batch_cpu_ms} }
                    0 .. $ROUNDS - 1;
logmsg sprintf('(f) batch busy stall: %.1f ms without prefault (batch-plain), %.1f ms with (median ratio %.2f, '
               . 'per round %s); loop CPU ratio %.2f; batch (traffic zone) %.1f ms',
               $summary{'batch-plain busy_median'}, $summary{'batch-prefault busy_median'}, median(@pf_ratio),
               join(' ', map { sprintf '%.2f', $_ } @pf_ratio), median(@pf_loop_ratio),
               $summary{'batch busy_median'});

logmsg sprintf('(f) batch-small (zone %dm) busy stall %.1f ms, batch-prefault %.1f ms',
               $SMALL_MB, $summary{'batch-small busy_median'}, $summary{'batch-prefault busy_median'});

my $cmd = $runs{old}[0]{wrk}{cmd};
$cmd =~ s/:\d+\//:PORT\//;
$cmd =~ s/\Q$REPO\E\///;
my $md = "## (f) Creating 10k new label sets under load\n\n";
$md .= "One nginx, 2 workers, zone 512m (and three more: two for the prefault comparison, one sized to its label sets). Each request to `/p/ID` records, in log_by_lua, "
     . "`bench_f_requests_total{path,status}` and `bench_f_duration_seconds{path}` (19 buckets) "
     . "through labels() handles cached per path. Stall detector: a 1 ms `ngx.timer.every` per "
     . "worker records the longest gap between two ticks in each run (bench/lua/shmprom_bench/"
     . "stall.lua): **busy stall** = by the worker's thread CPU clock (the longest stretch its "
     . "event loop ran without getting back to its timers), **wall gap** = by the monotonic "
     . "clock (also counts time the worker was preempted: this 2-core machine runs wrk, both "
     . "workers and other engineers' jobs); the longest of any worker, ms. "
     . "Load: `$cmd` (old: 10k existing paths), `... -- new BASE 5000` (each of the 2 threads "
     . "first sends 5,000 new paths: 10k new label sets = 10k counter + 10k histogram series, "
     . "then the old paths), batch: the old load plus, 1 s in, one request whose handler creates "
     . "10k new histogram label sets in a loop (`h:observe(0.01, { \"/b/\" .. i })`), into the first "
     . "zone, opened with the default `prefault = \"table\"` (its slot array resident); "
     . "batch-plain and batch-prefault: the same, the loop writing to one of two more 512m zones of "
     . "the same nginx that differ only in `prefault` (false / true), both given the same 10k old label "
     . "sets first and then only these batches: the pair isolates prefault (the batch row's zone also "
     . "takes the traffic's label sets, and the workers' label caches of its family differ); "
     . "batch-small: the same loop into a fourth zone, `prefault = true`, sized for the label sets it "
     . "gets (${SMALL_MB}m, `cells_per_series = 21`: the 10k old ones and one batch a round, a fifth to "
     . "spare), not judged: its slot array is 1-2 MiB against the 512m zones' 113, what a table "
     . "sized to its live series rather than to the zone's capacity would give; "
     . "batch-sliced: the batch row's loop into the first zone in slices of " . fmt_num($SLICE)
     . " label sets with `ngx.sleep(0.001)` between them (README.md, family:labels), not judged: "
     . "what slicing bounds a worker's stall to (its batch column: wall time from the first slice "
     . "to the last, CPU time and page faults of the slices alone); "
     . "batch-bare: the same loop with no metrics library, not judged (each iteration builds the "
     . "same `{ \"/b/\" .. i }` and puts its string into a per-worker Lua table, emptied at the "
     . "size a family's label cache is emptied at; bench/lua/shmprom_bench/fill.lua bare_batch): "
     . "the part of a batch that is the caller's own string and table work and LuaJIT's. The "
     . "batch column counts the page faults the loop's thread took (getrusage RUSAGE_THREAD, minor "
     . "+ major). "
     . "$ROUNDS rounds, modes rotated, ${SECS}s each; ratios against the old run of the same "
     . "round. The target is judged on the median over runs of each run's longest busy stall "
     . "(the worst run is shown beside it: on this shared machine a run disturbed by other "
     . "jobs shows in the baseline too).\n\n";
$md .= md_table([ 'mode', 'req/s', 'req/s ratio', 'p99 ms', 'p99 ratio', 'max latency ms',
                  'busy stall ms (median / worst run)', 'wall gap ms (median / worst run)', 'batch',
                  'target (busy stall)' ], @rows);
$md .= sprintf("\nbatch-prefault against batch-plain, round by round: longest busy stall %.1f ms against %.1f ms "
               . "(median of the per-round ratios %.2f; per round %s); the loop's CPU time ratio %.2f "
               . "(median). Prefaulting the 512m zone (%s) took %.0f ms in the master (init_by_lua) "
               . "and %s ms in each worker's init_worker.\n",
               $summary{'batch-prefault busy_median'}, $summary{'batch-plain busy_median'}, median(@pf_ratio),
               join(' ', map { sprintf '%.2f', $_ } @pf_ratio), median(@pf_loop_ratio), $pf->{how},
               $pf->{master_ms}, join(' and ', map { sprintf '%.0f', $_ // -1 } @{ $pf->{map_ms} }));
$md .= sprintf("\nbatch-bare, the loop with no metrics library: longest busy stall %.1f ms (loop %.1f ms CPU), "
               . "against %.1f ms (loop %.1f ms CPU) for the batch row: of each new label set's %.2f us of "
               . "CPU in the batch, %.2f us are the caller's string and table and LuaJIT's work on them.\n",
               $summary{'batch-bare busy_median'}, median(map { $_->{batch_cpu_ms} } @{ $runs{'batch-bare'} }),
               $summary{'batch busy_median'}, median(map { $_->{batch_cpu_ms} } @{ $runs{batch} }),
               1000 * median(map { $_->{batch_cpu_ms} } @{ $runs{batch} }) / $NEW,
               1000 * median(map { $_->{batch_cpu_ms} } @{ $runs{'batch-bare'} }) / $NEW);
my @small_ratio = map { $runs{'batch-small'}[$_]{batch_cpu_ms} / $runs{'batch-prefault'}[$_]{batch_cpu_ms} }
                  0 .. $ROUNDS - 1;
$md .= sprintf("\nbatch-small against batch-prefault (both zones resident, the same 10k old label sets, "
               . "then only their batches): slot arrays of %.1f and %.1f MiB; longest busy stall %.1f ms "
               . "against %.1f ms; the loop's CPU time %.1f against %.1f ms (median of the per-round "
               . "ratios %.2f; per round %s).\n",
               $slots_mib{small} // 0, $slots_mib{pf} // 0,
               $summary{'batch-small busy_median'}, $summary{'batch-prefault busy_median'},
               median(map { $_->{batch_cpu_ms} } @{ $runs{'batch-small'} }),
               median(map { $_->{batch_cpu_ms} } @{ $runs{'batch-prefault'} }), median(@small_ratio),
               join(' ', map { sprintf '%.2f', $_ } @small_ratio));
$md .= sprintf("\nbatch-sliced, the same 10k label sets in %d slices of %s with `ngx.sleep(0.001)` between: "
               . "longest busy stall %.1f ms (worst run %.1f) against %.1f ms for the batch row in one loop; "
               . "from the first slice to the last %.1f ms instead of %.1f (median), the slices' CPU "
               . "%.1f ms against the loop's %.1f.\n",
               $NEW / $SLICE, fmt_num($SLICE), $summary{'batch-sliced busy_median'},
               $summary{'batch-sliced busy_worst'}, $summary{'batch busy_median'},
               $summary{'batch-sliced batch_ms'}, $summary{'batch batch_ms'},
               median(map { $_->{batch_cpu_ms} } @{ $runs{'batch-sliced'} }),
               median(map { $_->{batch_cpu_ms} } @{ $runs{batch} }));
$md .= "\nAfter the runs the first zone holds " . fmt_num($series_c // 0) . " counter and "
     . fmt_num($series_h // 0) . " histogram label sets, the plain, prefault and small zones "
     . fmt_num($series2{plain} // 0) . ", " . fmt_num($series2{pf} // 0) . " and "
     . fmt_num($series2{small} // 0)
     . " histogram label sets; " . fmt_num($dropped) . " refused.\n\n";
if ($PEER) {
    my @prows = map { (row(\%peer_runs, $_, 0))[0] } @PEER_MODES;
    my (undef, $pb) = row(\%peer_runs, 'batch', 0);
    $md .= "Peer (nginx-lua-prometheus) **measured here**, side by side (after the runs above, same "
         . "load, same label sets, same stall detector, its own nginx with 2 workers and "
         . "`lua_shared_dict peer_f 1024m`): each request records "
         . "`peer_c:inc(1, { path, ngx.status })` and `peer_h:observe(..., { path })` in "
         . "log_by_lua (it has no handles), the batch `h:observe(0.01, { \"/b/\" .. i })` in a loop. "
         . "Its error metric read $peer_errors at the end (nothing evicted). Its workers stall even "
         . "with no new label set (old): each worker's counter increments are kept in a Lua table and "
         . "written into the dict once a second by a timer, one `incr` per key touched since (with "
         . "10k paths, up to 230k keys), all in one callback. The batch's busy stall, "
         . sprintf('%.0f ms, is %.0fx shmprom\'s default zone (%.1f ms).', $pb, $pb / $summary{'batch busy_median'},
                   $summary{'batch busy_median'}) . "\n\n";
    $md .= md_table([ 'peer mode', 'req/s', 'req/s ratio', 'p99 ms', 'p99 ratio', 'max latency ms',
                      'busy stall ms (median / worst run)', 'wall gap ms (median / worst run)', 'batch' ],
                    @prows);
    $md .= "\nanchors.md, for comparison: creating 10k new histogram label sets blocked a worker for "
         . "about 1.1 s.\n\n";
} else {
    $md .= "Peer (nginx-lua-prometheus) **from anchors.md**: creating 10k new histogram label sets "
         . "blocked a worker for about 1.1 s. Set PEER_LUA_PATH to measure it side by side.\n\n";
}
write_fragment('f', $md);
