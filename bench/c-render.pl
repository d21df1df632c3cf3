#!/usr/bin/env perl
# Bench (c): /metrics render time and size at 10k, 230k and 1M series, and
# every series present in the output.
#
# Per size a fresh nginx (2 workers, one zone) is filled through one request,
# then one request times R renders inside the worker: the library's render
# alone (shmprom_render through FFI, then freed) and m:metric_data() (render
# + copy into a Lua string). Then S scrapes of /metrics over HTTP (m:collect,
# rendered off the event loop) are timed with curl, and the last one is
# checked line by line: every expected series, no duplicate.
#
# Series counted as Prometheus counts them: one per sample line. A histogram
# with the peer's 19 default buckets has 20 `_bucket` lines (+Inf included),
# `_sum` and `_count`: 22 series. So 10k counters + 10k histograms =
# 10,000 + 220,000 = 230,000 series (the anchors' "10k+10k histograms
# (230k series)").

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head $REPO $WORK $QUICK $PEER free_ports nginx_start
             nginx_stop http_get http_get_json median minmax fmt_num md_table
             write_fragment spew slurp logmsg add_target $OUT);

my $REPS = $ENV{BENCH_C_REPS} || ($QUICK ? 3 : 7);
my $SCRAPES = $QUICK ? 2 : 5;

my @CASES = (
    { name => '10k', c => 10_000, h => 0, zone => '16m', target => 5 },
    { name => '230k', c => 10_000, h => 10_000, zone => '64m', target => 50 },
    { name => '1M', c => 43_478, h => 43_478, zone => '256m', target => 250 },
    # diagnostic: the same 230k series in a zone half the size (fewer slots
    # to scan); no target of its own
    { name => '230k-small-zone', c => 10_000, h => 10_000, zone => '32m', target => 50, diag => 1 },
);
my $HLINES = 22;    # 20 bucket lines + sum + count

sub conf {
    my ($case, $port, $peer) = @_;
    my $init = $peer ? '' : <<"EOL";
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        bench_m = shmprom.new{ zone = "bench_c", size = "$case->{zone}" }
        bench_c, bench_h = F.families(bench_m, "bench_c", "route")
    }
    init_worker_by_lua_block { bench_m:init_worker() }
EOL
    my $peer_init = !$peer ? '' : <<'EOL';
    lua_shared_dict peer_metrics 384m;
    init_worker_by_lua_block {
        local F = require "shmprom_bench.fill"
        peer_prom = require("prometheus").init("peer_metrics")
        bench_c, bench_h = F.families(peer_prom, "bench_c", "route")
    }
EOL
    my $collect = $peer ? 'peer_prom:collect()' : 'bench_m:collect()';
    # the peer's counters reach its dict at the worker's next sync (every
    # second); its metric_data() syncs the calling worker's first, and the
    # fill ran in that worker
    my $sync = $peer ? 'peer_prom:metric_data()' : '';
    my $render = $peer ? 'F.peer_render_times(peer_prom, n)' : 'F.render_times(bench_m, n)';
    return conf_head(workers => 2, conns => 256, temp => 1) . <<"EOC";
    lua_socket_log_errors off;
$init$peer_init
    server {
        listen 127.0.0.1:$port;
        location = /fill {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                local nc = tonumber(ngx.var.arg_c)
                local nh = tonumber(ngx.var.arg_h)
                local r1 = F.fill(bench_c, nil, 1, nc)
                local r2 = nh > 0 and F.fill(nil, bench_h, 1, nh)
                           or { failed = 0, seconds = 0 }
                $sync
                ngx.say(J.encode({ failed = r1.failed + r2.failed,
                                   err = r1.err or r2.err,
                                   seconds = r1.seconds + r2.seconds }))
            }
        }
        location = /render {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                local n = tonumber(ngx.var.arg_n)
                local r, err = $render
                if not r then
                    ngx.status = 500
                    ngx.say(err)
                    return
                end
                ngx.say(J.encode(r))
            }
        }
        location = /metrics { content_by_lua_block { $collect } }
    }
}
EOC
}

# check the scrape: every expected series once
sub verify {
    my ($file, $case) = @_;
    open my $fh, '<', $file or die "$file: $!\n";
    my (%c, %b, %s, %n, $dups, $lines, $cap);
    $dups = 0;
    $lines = 0;
    while (my $l = <$fh>) {
        next if $l =~ /^#/;
        $lines++;
        if ($l =~ /^shmprom_series_capacity (\S+)/) {
            $cap = $1;
            next;
        }
        if ($l =~ /^bench_c_requests_total\{route="(r\d+)",status="200"\} /) {
            $dups++ if $c{$1}++;
        } elsif ($l =~ /^bench_c_duration_seconds_bucket\{route="(r\d+)",le="([^"]+)"\} /) {
            $dups++ if $b{"$1 $2"}++;
        } elsif ($l =~ /^bench_c_duration_seconds_sum\{route="(r\d+)"\} /) {
            $dups++ if $s{$1}++;
        } elsif ($l =~ /^bench_c_duration_seconds_count\{route="(r\d+)"\} /) {
            $dups++ if $n{$1}++;
        }
    }
    close $fh;
    my $want = $case->{c} + $case->{h} * $HLINES;
    my $got = keys(%c) + keys(%b) + keys(%s) + keys(%n);
    return { want => $want, got => $got, dups => $dups, lines => $lines, capacity => $cap };
}

my @rows;
my %summary;
for my $lib ('shmprom', $PEER ? 'peer' : ()) {
    for my $case (@CASES) {
        next if $lib eq 'peer' && $case->{diag};
        if ($lib eq 'peer' && $case->{name} eq '1M') {
            push @rows, [ 'peer', $case->{name}, 'not run (anchors.md: the peer takes '
                          . 'applications down at 250k series)', ('-') x 8 ];
            next;
        }
        my ($port) = free_ports(1);
        my $nx = nginx_start(name => "c-$lib-$case->{name}", conf => conf($case, $port, $lib eq 'peer'),
                             ready => "http://127.0.0.1:$port/metrics", workers => 2);
        my $f = http_get_json("http://127.0.0.1:$port/fill?c=$case->{c}&h=$case->{h}", 600);
        die "fill $case->{name} ($lib): $f->{failed} refused: $f->{err}\n" if $f->{failed};
        my $r = http_get_json("http://127.0.0.1:$port/render?n=$REPS", 900);
        my (@scrape, $size);
        my $file = "$WORK/c-$lib-$case->{name}.metrics";
        for (1 .. $SCRAPES) {
            my ($code, $t, $sz) = http_get("http://127.0.0.1:$port/metrics", 300, $file);
            die "scrape $case->{name}: HTTP $code\n" unless $code eq '200';
            push @scrape, $t * 1000;
            $size = $sz;
        }
        my $v = verify($file, $case);
        unlink $file unless $ENV{BENCH_KEEP};
        nginx_stop($nx);
        my $rm = $lib eq 'shmprom' ? median(@{ $r->{render_ms} }) : undef;
        my $mm = median(@{ $r->{metric_data_ms} });
        my $sm = median(@scrape);
        my $series = $case->{c} + $case->{h} * $HLINES;
        my $judge = $lib eq 'peer' ? $mm : $rm;
        my $verdict = $lib eq 'peer' ? '' : ($judge <= $case->{target} ? 'met'
            : sprintf('MISSED by %s ms (%.1fx)', fmt_num($judge - $case->{target}), $judge / $case->{target}));
        my $missing = $v->{want} - $v->{got};
        my $present = $missing == 0 && $v->{dups} == 0 ? 'all ' . fmt_num($v->{want}, 9) . ' present'
            : sprintf('%d missing, %d duplicated', $missing, $v->{dups});
        push @rows, [ $lib, $case->{name},
                      fmt_num($case->{c}, 9) . ' counters + ' . fmt_num($case->{h}, 9) . ' histograms = '
                      . fmt_num($series, 9) . ' series',
                      $lib eq 'peer' ? '-' : "$case->{zone} (capacity " . fmt_num($v->{capacity}) . ' label sets)',
                      sprintf('%.2f s', $f->{seconds}), defined $rm ? fmt_num($rm) : '-', fmt_num($mm),
                      fmt_num($sm), sprintf('%.1f MB', $size / 1e6), $present,
                      $lib eq 'peer' ? '' : $case->{diag} ? 'diagnostic (same series, smaller zone)'
                      : "<= $case->{target} ms: $verdict" ];
        $summary{"$lib $case->{name}"} = $judge;
        if ($lib eq 'shmprom' && !$case->{diag}) {
            add_target("c-$case->{name}", "(c) render of $case->{name} series",
                       "<= $case->{target} ms, none missing",
                       sprintf('%s ms (Rust render; metric_data %s ms, HTTP scrape %s ms); %s', fmt_num($rm),
                               fmt_num($mm), fmt_num($sm), $present),
                       ($judge <= $case->{target} && $missing == 0 && $v->{dups} == 0) ? 'met'
                       : $verdict . ($missing || $v->{dups} ? "; $present" : ''));
        }
        logmsg sprintf('(c) %s %s: render %s ms, metric_data %s ms, scrape %s ms, %s', $lib,
                       $case->{name}, fmt_num($rm), fmt_num($mm), fmt_num($sm), $present);
    }
}

my $md = "## (c) /metrics render time and size\n\n";
$md .= "Per size: a fresh nginx (2 workers; zone size as shown), filled by one request "
     . "(counters `bench_c_requests_total{route=\"r000123\",status=\"200\"}`, histograms "
     . "`bench_c_duration_seconds{route=\"r000123\"}` with the peer's 19 default buckets: 20 "
     . "`_bucket` lines + `_sum` + `_count` = 22 series each). Then one request times $REPS "
     . "renders inside the worker (bench/lua/shmprom_bench/fill.lua `render_times`): "
     . "**render** = `shmprom_render()` through FFI (the Rust render alone), **metric_data** = "
     . "`m:metric_data()` (render + copy into a Lua string); medians. **scrape** = `curl "
     . "http://127.0.0.1:PORT/metrics` time_total (`m:collect()`, rendered off the event loop), "
     . "median of $SCRAPES. The last scrape is checked line by line: every expected series "
     . "exactly once. The target applies to the render.\n\n";
$md .= md_table([ 'lib', 'size', 'series', 'zone (shmprom_series_capacity)', 'fill time', 'render ms', 'metric_data ms',
                  'scrape ms (HTTP)', 'size', 'series present', 'target' ], @rows) . "\n";
$md .= "\nPeer (nginx-lua-prometheus) **from anchors.md, not measured here**: 10k counters 21.5 ms; "
     . "10k+10k histograms (230k series) 1.44 s, 14.8 MB, 11 series missing; falls over at 250k.\n\n"
    unless $PEER;
write_fragment('c', $md);
