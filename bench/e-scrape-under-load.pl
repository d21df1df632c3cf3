#!/usr/bin/env perl
# Bench (e): scraping 230k series back to back while wrk loads nginx.
#
# One nginx (2 workers): a zone holding 230k series (10k counters + 10k
# histograms of 19 buckets) plus the README example recording every request
# of the load port; /metrics (m:collect()) on another port of the same
# workers. Per run wrk loads the README port while a scraper process (forked
# here, stopped by pid) fetches /metrics: never, once a second, or back to
# back; once a second also with `Accept-Encoding: gzip`, as Prometheus
# sends it. Modes alternate (rotated order per round); req/s and p99 per mode
# are set against the no-scrape run of the same round, medians over rounds.
#
#   BENCH_E_MODES="none every1s"   a subset of the modes (none is needed);
#       a mode may end in -niceN (every1s-gzip-nice0): the render threads
#       run at that render_nice during its runs (set through the C ABI at
#       the next scrape of each worker); when any mode does, the others run
#       at the default, 5
#   BENCH_E_NEW_OPTS='gzip = false'   more options for shmprom.new
#
# With PEER_LUA_PATH, a second nginx runs the peer (nginx-lua-prometheus)
# with the same series and the same README example (its metrics), scraped
# by its collect(): never, once a second, back to back.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head $REPO $WORK $QUICK $PEER free_ports nginx_start
             nginx_stop http_get http_get_json wrk_run median minmax fmt_num
             md_table write_fragment spew slurp logmsg spawn_child
             stop_child add_target stall_locations wait_for_conns $OUT);
use IO::Socket::INET;
use Time::HiRes qw(time sleep);

my $STALL_LOCATIONS = stall_locations();

my $SECS = $ENV{BENCH_SECS} || ($QUICK ? 3 : 10);
my $ROUNDS = $ENV{BENCH_ROUNDS} || ($QUICK ? 3 : 5);
my @MODES = split ' ', ($ENV{BENCH_E_MODES} || 'none every1s every1s-gzip continuous');
die "BENCH_E_MODES must include none\n" unless grep { $_ eq 'none' } @MODES;
my $NEW_OPTS = $ENV{BENCH_E_NEW_OPTS} ? ", $ENV{BENCH_E_NEW_OPTS}" : '';
my $SET_NICE = grep { /-nice\d+$/ } @MODES;

# readme_server(port): the loaded server, recording the README example's
# two metrics (metric_requests, metric_latency: each library defines them
# its own way) the same way for shmprom and the peer
sub readme_server {
    my ($p) = @_;
    return <<"EOS";
    server {
        listen 127.0.0.1:$p;
        server_name bench;
        location / { return 200 "hello\\n"; }
        log_by_lua_block {
            metric_requests:inc(1, {ngx.var.server_name, ngx.var.status})
            metric_latency:observe(tonumber(ngx.var.request_time), {ngx.var.server_name})
        }
    }
EOS
}

my ($port, $mport) = free_ports(2);
my $conf = conf_head(workers => 2, conns => 1024) . <<"EOC";
    lua_shared_dict stall 1m;
    lua_shared_dict bench_ctl 64k;
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        bench_m = shmprom.new{ zone = "bench_e", size = "64m"$NEW_OPTS }
        bench_c, bench_h = F.families(bench_m, "bench_c", "route")
        -- the README example's two metrics
        metric_requests, metric_latency = require("shmprom_bench.readme").setup(bench_m)
    }
    init_worker_by_lua_block {
        bench_m:init_worker()
        require("shmprom_bench.stall").start("stall", 0.001)
    }
${\ readme_server($port) }    server {
        listen 127.0.0.1:$mport;
        location = /metrics {
            content_by_lua_block {
                local n = ngx.shared.bench_ctl:get("render_nice")
                if n and n ~= bench_nice then
                    bench_nice = n
                    local ffi = require "ffi"
                    ffi.load(bench_m.lib).shmprom_render_set_nice(bench_m.ptr, n)
                end
                bench_m:collect()
            }
        }
        location = /nice {
            content_by_lua_block {
                ngx.shared.bench_ctl:set("render_nice", tonumber(ngx.var.arg_n))
                ngx.say("ok")
            }
        }
$STALL_LOCATIONS
        # diagnostic: m:collect()'s steps timed one by one (the same public
        # C ABI calls and the same 256 KiB pieces as resty.shmprom's
        # collect), by the worker's CPU clock: what of a scrape runs on the
        # event loop, and its longest stretch
        location = /breakdown {
            content_by_lua_block {
                local ffi = require "ffi"
                local F = require "shmprom_bench.fill"
                local lib = ffi.load(bench_m.lib)
                local out = ffi.new("const uint8_t*[1]")
                local len = ffi.new("size_t[1]")
                local handle = ffi.new("const void*[1]")
                local err = ffi.new("char[256]")
                local t0 = F.mono_ns()
                local nb = lib.shmprom_clock_ns()
                for _ = 1, 5000 do
                    local rc = lib.shmprom_render_poll(bench_m.ptr, 0, nb, out, len,
                                                       handle, err, 256)
                    if rc == 1 then break end
                    if rc ~= 0 then return ngx.exit(500) end
                    ngx.sleep(0.001)
                end
                local t1 = F.mono_ns()
                local ptr, n = out[0], tonumber(len[0])
                local CHUNK = 256 * 1024
                local off, pieces, total, longest = 0, 0, 0, 0
                while off < n do
                    local k = n - off
                    if k > CHUNK then k = CHUNK end
                    local c0 = F.cpu_ns()
                    ngx.print(ffi.string(ptr + off, k))
                    local d = F.cpu_ns() - c0
                    total = total + d
                    if d > longest then longest = d end
                    pieces = pieces + 1
                    off = off + k
                    if off < n then ngx.flush(true); ngx.sleep(0.001) end
                end
                lib.shmprom_render_release(handle[0])
                local c2 = F.cpu_ns()
                collectgarbage()
                local c3 = F.cpu_ns()
                breakdown = { wait_ms = (t1 - t0) / 1e6, pieces = pieces,
                              total_ms = total / 1e6, longest_ms = longest / 1e6,
                              gc_ms = (c3 - c2) / 1e6, bytes = n,
                              id = tonumber(ngx.var.arg_id) }
            }
        }
        location = /breakdown/read {
            content_by_lua_block {
                ngx.say(require("shmprom_bench.json").encode(breakdown or {}))
            }
        }
        location = /fill {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                local r1 = F.fill(bench_c, bench_h, 1, 10000)
                ngx.say(J.encode(r1))
            }
        }
    }
}
EOC

# scraper(path_file, mode, secs, port): the scraper process
sub scraper {
    my ($file, $mode, $secs, $mport) = @_;
    open my $out, '>', $file or die "$file: $!\n";
    $out->autoflush(1);
    # wrk's 50 connections first (and this check's): a first scrape that
    # holds a worker (the peer's render does) would otherwise leave wrk
    # to connect to the other one only, and spare its requests the stall
    wait_for_conns($mport, 51, 10) or print {$out} "# wrk's connections not seen\n";
    my $deadline = time + $secs + 5;
    for (1 .. 100_000) {
        last if time > $deadline;
        my $t0 = time;
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $mport, Proto => 'tcp',
                                      Timeout => 10) or next;
        my $ae = $mode =~ /gzip/ ? "Accept-Encoding: gzip\r\n" : '';
        print {$s} "GET /metrics HTTP/1.1\r\nHost: bench\r\n${ae}Connection: close\r\n\r\n";
        my ($buf, $n, $head) = ('', 0, '');
        while (my $r = sysread($s, $buf, 1 << 20)) {
            $head = substr($buf, 0, 12) if $n == 0;
            $n += $r;
        }
        close $s;
        my $t1 = time;
        printf {$out} "%.6f %d %s\n", $t1 - $t0, $n, $head =~ /HTTP\/1\.1 200/ ? 'ok' : 'bad';
        if ($mode =~ /^every1s/) {
            my $left = $t0 + 1 - time;
            sleep $left if $left > 0;
        }
    }
    close $out;
}

my $nx = nginx_start(name => 'e-scrape', conf => $conf, ready => "http://127.0.0.1:$mport/metrics",
                     workers => 2);
my $f = http_get_json("http://127.0.0.1:$mport/fill", 120);
die "fill: $f->{failed} refused\n" if $f->{failed};
my ($code, $t, $size) = http_get("http://127.0.0.1:$mport/metrics", 60, "$WORK/e.metrics");
my $lines = 0;
open my $mf, '<', "$WORK/e.metrics" or die;
while (<$mf>) { $lines++ unless /^#/ }
close $mf;
unlink "$WORK/e.metrics";
logmsg "(e) zone holds $lines sample lines, $size bytes";

# what of one scrape runs on the event loop (no load; worker_processes 2, so
# the read goes to whichever worker: retry until it is the one that served)
my %bd;
for my $i (1 .. 5) {
    http_get("http://127.0.0.1:$mport/breakdown?id=$i", 60, "$WORK/e.breakdown");
    for (1 .. 30) {
        my $d = http_get_json("http://127.0.0.1:$mport/breakdown/read", 5);
        if (ref $d eq 'HASH' && ($d->{id} // 0) == $i) { push @{ $bd{$_} }, $d->{$_} for keys %$d; last }
    }
}
unlink "$WORK/e.breakdown";

# run_rounds(lib, port, mport, workers, set_nice, modes...) -> (runs, scrapes)
# $ROUNDS rounds, the modes in a rotated order each round
sub run_rounds {
    my ($lib, $port, $mport, $workers, $set_nice, @modes) = @_;
    my $url = "http://127.0.0.1:$port/";
    wrk_run(url => $url, threads => 2, conns => 50, secs => $QUICK ? 1 : 2);
    my (%runs, %scrapes);
    for my $r (0 .. $ROUNDS - 1) {
        my @order = (@modes[$r % @modes .. $#modes], @modes[0 .. $r % @modes - 1]);
        for my $mode (@order) {
            my $file = "$WORK/e-scrapes-$lib-$r-$mode.txt";
            http_get("http://127.0.0.1:$mport/nice?n=" . ($mode =~ /-nice(\d+)$/ ? $1 : 5), 5)
                if $set_nice;
            http_get("http://127.0.0.1:$mport/stall/reset", 5);
            sleep 0.05;
            my $pid;
            $pid = spawn_child("scraper-$mode", sub { scraper($file, $mode, $SECS, $mport) })
                if $mode ne 'none';
            my $res = wrk_run(url => $url, threads => 2, conns => 50, secs => $SECS, latency => 1,
                              workers => $workers);
            my $sc_cpu = $pid ? Bench::cpu_ticks($pid) : 0;
            stop_child($pid) if $pid;
            my $stall = http_get_json("http://127.0.0.1:$mport/stall/read", 5);
            ($runs{$mode}[$r]{busy}) = sort { $b <=> $a } @{ $stall->{cpu} };
            ($runs{$mode}[$r]{wall}) = sort { $b <=> $a } @{ $stall->{wall} };
            $runs{$mode}[$r]{scraper_cpu} = $sc_cpu / Bench::clk_tck() / $res->{secs};
            if ($pid) {
                for my $l (grep { !/^#/ } split /\n/, slurp($file) // '') {
                    my ($d, $n, $ok) = split ' ', $l;
                    push @{ $scrapes{$mode} }, { secs => $d, bytes => $n, ok => $ok };
                }
                $runs{$mode}[$r]{scrapes} = scalar(grep { !/^#/ } split /\n/, slurp($file) // '');
            }
            $runs{$mode}[$r]{wrk} = $res;
            logmsg sprintf('(e) %s round %d %-10s %8.0f req/s p99 %.2f ms max %.1f ms scrapes %s busy %.1f ms '
                           . 'wall %.1f ms cpu/req %.2f us, worker CPU shares %s',
                           $lib, $r + 1, $mode, $res->{rps}, 1000 * $res->{p99}, 1000 * $res->{max},
                           $runs{$mode}[$r]{scrapes} // 0, $runs{$mode}[$r]{busy}, $runs{$mode}[$r]{wall},
                           $res->{cpu_us_per_req} // -1,
                           join('/', map { sprintf '%.2f', $_ } @{ $res->{worker_shares} || [] }));
        }
    }
    return (\%runs, \%scrapes);
}
my ($runs_ref, $scrapes_ref) = run_rounds('shmprom', $port, $mport, $nx->{workers}, $SET_NICE, @MODES);
my %runs = %$runs_ref;
my %scrapes = %$scrapes_ref;
nginx_stop($nx);

# The peer side by side: the same 230k series and README metrics in its
# dict, the same load, its collect() on /metrics (it renders in the worker
# that serves the scrape).
my @PEER_MODES = qw(none every1s continuous);
my (%peer_runs, %peer_scrapes, $peer_lines, $peer_size, $peer_missing);
if ($PEER) {
    my ($pport, $pmport) = free_ports(2);
    my $pconf = conf_head(workers => 2, conns => 1024) . <<"EOC";
    lua_shared_dict stall 1m;
    lua_shared_dict peer_e 512m;
    init_worker_by_lua_block {
        local F = require "shmprom_bench.fill"
        peer_prom = require("prometheus").init("peer_e")
        bench_c, bench_h = F.families(peer_prom, "bench_c", "route")
        -- the README example's two metrics
        metric_requests, metric_latency = require("shmprom_bench.readme").setup(peer_prom)
        require("shmprom_bench.stall").start("stall", 0.001)
    }
${\ readme_server($pport) }    server {
        listen 127.0.0.1:$pmport;
        location = /metrics { content_by_lua_block { peer_prom:collect() } }
$STALL_LOCATIONS
        location = /fill {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local r = F.fill(bench_c, bench_h, 1, 10000)
                -- the peer's counters reach its dict at the worker's next
                -- sync; metric_data() syncs this worker's (the filler's)
                peer_prom:metric_data()
                ngx.say(require("shmprom_bench.json").encode(r))
            }
        }
    }
}
EOC
    my $pnx = nginx_start(name => 'e-peer', conf => $pconf, ready => "http://127.0.0.1:$pmport/stall/read",
                          workers => 2);
    http_get_json("http://127.0.0.1:$pmport/fill", 300);
    (undef, undef, $peer_size) = http_get("http://127.0.0.1:$pmport/metrics", 120, "$WORK/e-peer.metrics");
    $peer_lines = 0;
    open my $pf, '<', "$WORK/e-peer.metrics" or die;
    while (<$pf>) { $peer_lines++ if /^bench_c_/ }
    close $pf;
    unlink "$WORK/e-peer.metrics";
    # (c) finds the same: a few series missing from its scrapes
    $peer_missing = 230_000 - $peer_lines;
    logmsg "(e) peer dict holds $peer_lines of the 230,000 series filled, $peer_size bytes per scrape";
    my ($pr, $ps) = run_rounds('peer', $pport, $pmport, $pnx->{workers}, 0, @PEER_MODES);
    %peer_runs = %$pr;
    %peer_scrapes = %$ps;
    nginx_stop($pnx);
}

# row(runs, scrapes, mode, target?) -> (table row, req/s ratio, p99 ratio, p99 s)
sub row {
    my ($runs, $scrapes, $mode, $judge) = @_;
    my (@rps, @p99, @max, @rr, @pr, @n, @busy, @wall, @scpu, @cpr);
    for my $r (0 .. $ROUNDS - 1) {
        my $w = $runs->{$mode}[$r]{wrk};
        my $b = $runs->{none}[$r]{wrk};
        push @rps, $w->{rps};
        push @p99, $w->{p99};
        push @max, $w->{max};
        push @rr, $w->{rps} / $b->{rps};
        push @pr, $w->{p99} / $b->{p99};
        push @n, $runs->{$mode}[$r]{scrapes} // 0;
        push @busy, $runs->{$mode}[$r]{busy};
        push @wall, $runs->{$mode}[$r]{wall};
        push @scpu, $runs->{$mode}[$r]{scraper_cpu};
        push @cpr, $w->{cpu_us_per_req} / $b->{cpu_us_per_req};
    }
    my $sc = $scrapes->{$mode} || [];
    my $bad = grep { $_->{ok} ne 'ok' } @$sc;
    my $med_scrape = median(map { $_->{secs} } @$sc);
    my ($rmed, $pmed) = (median(@rr), median(@pr));
    my $target = '';
    if ($judge && $mode =~ /^every1s/) {
        $target = sprintf('req/s >= 0.95: %s; p99 <= 1.5x: %s',
                          $rmed >= 0.95 ? 'met' : sprintf('MISSED by %.3f', 0.95 - $rmed),
                          $pmed <= 1.5 ? 'met' : sprintf('MISSED (%.2fx)', $pmed));
    }
    my $row = [ $mode, fmt_num(median(@rps)), $mode eq 'none' ? '1 (baseline)' : sprintf('%.3f', $rmed),
                sprintf('%.2f', 1000 * median(@p99)), $mode eq 'none' ? '1 (baseline)' : sprintf('%.2f', $pmed),
                sprintf('%.1f', 1000 * median(@max)),
                sprintf('%.1f / %.1f', median(@busy), median(@wall)),
                $mode eq 'none' ? '-' : sprintf('%.3f', median(@cpr)),
                $mode eq 'none' ? '-' : sprintf('%.1f%%', 100 * median(@scpu)),
                $mode eq 'none' ? '-' : sprintf('%s per run; median %.0f ms, %s bytes each%s',
                                                median(@n), 1000 * ($med_scrape // 0),
                                                fmt_num(median(map { $_->{bytes} } @$sc) // 0),
                                                $bad ? "; $bad failed" : '') ];
    push @$row, $target if $judge;
    return ($row, $rmed, $pmed, median(@p99));
}

my @rows;
my %summary;
for my $mode (@MODES) {
    my ($row, $rmed, $pmed, $p99) = row(\%runs, \%scrapes, $mode, 1);
    push @rows, $row;
    if ($mode =~ /^every1s/) {
        my ($id, $how) = $mode eq 'every1s' ? ('e', '') : ("e-$mode", " ($mode)");
        $id =~ s/^e-every1s-/e-/;
        add_target("$id-rps", "(e) 1 scrape/s of 230k series$how under load: req/s vs no scraping", '>= 0.95',
                   sprintf('%.3f', $rmed), $rmed >= 0.95 ? 'met' : sprintf('MISSED by %.3f', 0.95 - $rmed));
        add_target("$id-p99", "(e) 1 scrape/s of 230k series$how under load: p99 vs no scraping", '<= 1.5x',
                   sprintf('%.2fx (%.1f ms vs %.1f ms)', $pmed, 1000 * $p99,
                           1000 * median(map { $runs{none}[$_]{wrk}{p99} } 0 .. $ROUNDS - 1)),
                   $pmed <= 1.5 ? 'met' : sprintf('MISSED by %.2fx', $pmed - 1.5));
    }
    $summary{"$mode rps"} = $rmed;
    $summary{"$mode p99"} = $pmed;
}

my $cmd = $runs{none}[0]{wrk}{cmd};
$cmd =~ s/:\d+\//:PORT\//;
my $md = "## (e) Scraping 230k series under load\n\n";
$md .= "One nginx, 2 workers (nginx's default accept, no reuseport); the zone holds " . fmt_num($lines) . " sample lines ("
     . sprintf('%.1f MB', $size / 1e6) . " per scrape: 10k counters + 10k histograms of 19 buckets "
     . "= 230k series, plus the README metrics and self-metrics). Load: `$cmd` on a server running "
     . "the README example in log_by_lua. Scraper (a process forked by the bench, stopped by pid "
     . "when wrk ends; its first scrape waits until wrk's 50 connections are open, so that a "
     . "scrape holding a worker cannot keep wrk from connecting to it): `GET /metrics` "
     . "(`m:collect()`, same 2 workers, another port) never "
     . "(baseline), once a second (start to start), or back to back. $ROUNDS rounds, modes in a "
     . "rotated order; ratios against the no-scrape run of the same round, medians.\n\n";
$md .= md_table([ 'scraping', 'req/s', 'req/s ratio', 'p99 ms', 'p99 ratio', 'max latency ms',
                  'worker stall ms busy / wall', 'worker CPU/req ratio', 'scraper CPU (of 1 core)',
                  'scrapes', 'target' ], @rows);
$md .= "\nworker stall: the stall detector of (f) (a 1 ms timer per worker; busy = longest "
     . "stretch of the event loop by the worker thread's CPU clock, wall = longest gap by the "
     . "monotonic clock, preemption included), longest of either worker, median of runs. "
     . "worker CPU/req ratio: with scraping / baseline (utime+stime of the worker processes, "
     . "render threads included). scraper CPU: the scraper process (Perl, reading the whole "
     . "response), share of one core during the run: on this 2-core machine it competes with "
     . "nginx and wrk.\n";
$md .= sprintf("\nWhat of one scrape (no load, %s bytes) runs on a worker's event loop, timed step by "
     . "step by the worker's CPU clock (diagnostic handler `/breakdown` repeating `m:collect()`'s "
     . "calls and its 256 KiB pieces; medians of %d): waiting for the render thread %.1f ms "
     . "(wall; the event loop is free meanwhile), then %d pieces of `ffi.string` + `ngx.print` "
     . "taking %.1f ms in all, the longest %.2f ms, each followed by `ngx.flush(true)` and "
     . "`ngx.sleep(0.001)` (the worker serves others until the piece is sent, and for a timer's "
     . "turn after); a full GC after the scrape %.1f ms.\n",
     fmt_num(median(@{ $bd{bytes} || [] })), scalar(@{ $bd{wait_ms} || [] }),
     median(@{ $bd{wait_ms} || [] }) // -1, median(@{ $bd{pieces} || [] }) // -1,
     median(@{ $bd{total_ms} || [] }) // -1, median(@{ $bd{longest_ms} || [] }) // -1,
     median(@{ $bd{gc_ms} || [] }) // -1)
    if $bd{wait_ms};
if ($PEER) {
    my @prows = map { (row(\%peer_runs, \%peer_scrapes, $_, 0))[0] } @PEER_MODES;
    $md .= "\nPeer (nginx-lua-prometheus) **measured here**, side by side (after the runs above, its "
         . "own nginx with 2 workers, the same load and README example recorded by its metrics, "
         . "`lua_shared_dict peer_e 512m` holding " . fmt_num($peer_lines) . " of the 230,000 series"
         . ($peer_missing ? " (its scrape misses $peer_missing, as in (c))" : '') . ", "
         . sprintf('%.1f MB', $peer_size / 1e6) . " per scrape; `/metrics` is its `collect()`, "
         . "rendered in the worker that serves it; the same scraper, never, once a second, back "
         . "to back):\n\n";
    $md .= md_table([ 'peer scraping', 'req/s', 'req/s ratio', 'p99 ms', 'p99 ratio', 'max latency ms',
                      'worker stall ms busy / wall', 'worker CPU/req ratio', 'scraper CPU (of 1 core)',
                      'scrapes' ], @prows);
    $md .= "\nanchors.md, for comparison: scraping back to back halved throughput (127k -> 66.5k "
         . "req/s) and raised max latency from 26 ms to 283 ms; each scrape of 230k series "
         . "blocks a worker for 1.44 s.\n\n";
} else {
    $md .= "\nPeer (nginx-lua-prometheus) **from anchors.md**: scraping back to back halved throughput "
         . "(127k -> 66.5k req/s) and raised max latency from 26 ms to 283 ms; each scrape of 230k "
         . "series blocks a worker for 1.44 s. Set PEER_LUA_PATH to measure it side by side.\n\n";
}
write_fragment('e', $md);
