#!/usr/bin/env perl
# Bench (d): zone bytes per series.
#
# nginx with 2 workers (planes default: one per worker = 2, plus the shared
# plane), one zone per size. Reads shmprom_zone_bytes{type="used"} after
# creating the first counter series and again after N more, with 2 short
# label values (up to 3 characters each), then fills the zone until the
# first series is refused.
# Reported both ways: used bytes delta / N, and zone size / capacity (the
# advertised shmprom_series_capacity and the count actually stored).
# Also: a histogram series (1 label, 15 buckets) by the used-bytes delta.
# With PEER_LUA_PATH, the peer (nginx-lua-prometheus) with the same series
# in a lua_shared_dict, by the dict's free space before and after.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head $REPO $WORK $QUICK $PEER free_ports nginx_start
             nginx_stop http_get http_get_json fmt_num md_table write_fragment
             spew logmsg add_target $OUT);

my @SIZES = $QUICK ? ('32m') : ('8m', '32m', '128m');
my $N = 100_000;
my $NH = 10_000;

sub bytes_of {
    my ($s) = @_;
    my ($n, $u) = $s =~ /^(\d+)([km]?)$/;
    return $n * ($u eq 'm' ? 1 << 20 : $u eq 'k' ? 1 << 10 : 1);
}

sub self_metrics {
    my ($port) = @_;
    my ($code, undef, undef, $m) = http_get("http://127.0.0.1:$port/metrics", 60);
    die "metrics: HTTP $code\n" unless $code eq '200';
    my %v;
    $v{used} = $1 if $m =~ /^shmprom_zone_bytes\{type="used"\} (\S+)$/m;
    $v{capacity_bytes} = $1 if $m =~ /^shmprom_zone_bytes\{type="capacity"\} (\S+)$/m;
    $v{series_capacity} = $1 if $m =~ /^shmprom_series_capacity (\S+)$/m;
    $v{planes} = $1 if $m =~ /^shmprom_planes\{state="total"\} (\S+)$/m;
    $v{series} = $1 if $m =~ /^shmprom_series\{family="bench_d_total"\} (\S+)$/m;
    return \%v;
}

my @rows;
my %summary;
# each size with the default planes, and 32m with `planes = 4`: two planes
# per worker (so that the new workers of a reload find planes free while
# the old ones finish), the default until 26 Nov 2026
my @CONFIGS = ((map { [ $_, undef ] } @SIZES), [ '32m', 4 ]);
for my $cfg (@CONFIGS) {
    my ($size, $planes) = @$cfg;
    my $popt = defined $planes ? ", planes = $planes" : '';
    my ($port) = free_ports(1);
    my $conf = conf_head(workers => 2, conns => 256, log => 'crit') . <<"EOC";
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        bench_m = shmprom.new{ zone = "bench_d", size = "$size"$popt }
        bench_c = bench_m:counter("bench_d_total", "2 short labels", { "a", "b" })
        bench_h = bench_m:histogram("bench_d_seconds", "1 label, 15 buckets",
                                    { "op" }, require("shmprom_bench.update").BUCKETS15)
    }
    init_worker_by_lua_block { bench_m:init_worker() }
    server {
        listen 127.0.0.1:$port;
        location = /fill {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                local from, to = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
                ngx.say(J.encode(F.fill_short(bench_c, from, to)))
            }
        }
        location = /fillh {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                ngx.say(J.encode(F.fill_hist(bench_h, 1, tonumber(ngx.var.arg_n))))
            }
        }
        location = /metrics { content_by_lua_block { bench_m:collect() } }
    }
}
EOC
    my $nx = nginx_start(name => "d-$size" . ($planes // ''), conf => $conf, ready => "http://127.0.0.1:$port/metrics",
                         workers => 2);
    my $vc = self_metrics($port);
    # the first series pays the zone's one-off costs (the key arena's first
    # block aligned after the family's strings): not a cost per series
    my $r0 = http_get_json("http://127.0.0.1:$port/fill?from=0&to=0", 30);
    die "(d) the first series was refused\n" unless $r0->{created} == 1;
    my $v0 = self_metrics($port);
    my $zone = bytes_of($size);
    my $n = $N;
    my $r1 = http_get_json("http://127.0.0.1:$port/fill?from=1&to=$n", 120);
    $n = $r1->{created};
    my $v1 = self_metrics($port);
    my $hr = http_get_json("http://127.0.0.1:$port/fillh?n=$NH", 120);
    my $v2 = self_metrics($port);
    # fill until refused
    my $r2 = http_get_json("http://127.0.0.1:$port/fill?from=" . ($n + 1) . "&to=100000000", 600);
    my $v3 = self_metrics($port);
    nginx_stop($nx);
    my $per_used = ($v1->{used} - $v0->{used}) / $n;
    my $per_h = $hr->{failed} ? undef : ($v2->{used} - $v1->{used}) / $NH;
    my $per_cap = $zone / $v0->{series_capacity};
    # label sets held when the first one was refused: the counters and the
    # histogram series that got in
    my $stored = ($v3->{series} // (1 + $n + $r2->{created})) + ($NH - $hr->{failed});
    my $first = $v0->{used} - $vc->{used};
    my $per_stored = $zone / $stored;
    my $limit = 64;
    my $verdict = sub {
        my ($x) = @_;
        return 'met' if $x <= $limit;
        return sprintf('MISSED by %.4f B', $x - $limit) if $x - $limit < 1;
        return sprintf('MISSED by %.0f B (%.0f%%)', $x - $limit, 100 * ($x - $limit) / $limit);
    };
    push @rows, [ $size . (defined $planes ? " (planes = $planes)" : ''), $v0->{planes}, sprintf('%.0f', $first),
                  fmt_num($n, 9), sprintf('%.2f', $per_used), $verdict->($per_used),
                  fmt_num($v0->{series_capacity}, 9), sprintf('%.1f', $per_cap), $verdict->($per_cap),
                  fmt_num($stored, 9), sprintf('%.1f', $per_stored),
                  defined $per_h ? sprintf('%.0f', $per_h) : 'refused' ];
    my $sk = $size . (defined $planes ? " planes=$planes" : '');
    $summary{"$sk used"} = $per_used;
    $summary{"$sk capacity"} = $per_cap;
    $summary{"$sk histogram"} = $per_h if defined $per_h;
    logmsg sprintf('(d) %s: %.1f B/series used, %.1f B/series by capacity, %s stored',
                   $size, $per_used, $per_cap, $stored);
    $summary{"$sk refused_err"} = $r2->{err} // '';

    if ($size eq '32m' && !defined $planes) {
        add_target('d-used', '(d) zone bytes per counter series (2 workers, 2 short labels): used delta / N',
                   '<= 64 B', sprintf('%.2f B (zone %s, default planes: one per worker)', $per_used, $size),
                   $verdict->($per_used));
        # Sizing, not the target's measure: the peer's 384 B of the target
        # row is what a series uses; by capacity the peer is a 10 MB dict
        # for about 21k series (anchors.md), ~476 B.
        add_target('d-capacity', '(d) zone bytes per counter series by capacity: zone size / series '
                   . 'the zone accepts (sizing; the target is judged on used bytes, as the peer\'s 384 B is)',
                   'none (peer: 10 MB / ~21k = ~476 B)',
                   sprintf('%.1f B (zone %s: capacity %s series; %.1fx less than the peer)', $per_cap, $size,
                           fmt_num($v0->{series_capacity}), 10e6 / 21e3 / $per_cap),
                   'sizing figure');
    }
}

# The peer: the same counter and histogram series in its dict; bytes per
# series = the dict's free space (ngx.shared.DICT:free_space(), whole free
# pages) before less after, over the series made. Its counters reach the
# dict at the worker's next sync: the handler forces it through
# metric_data(), which syncs the calling worker's counters first (the fill
# runs in that worker).
my %peer;
if ($PEER) {
    my ($port) = free_ports(1);
    my $conf = conf_head(workers => 2, conns => 256, log => 'crit') . <<"EOC";
    lua_shared_dict peer_d 256m;
    init_worker_by_lua_block {
        peer_prom = require("prometheus").init("peer_d")
        bench_c = peer_prom:counter("bench_d_total", "2 short labels", { "a", "b" })
        bench_h = peer_prom:histogram("bench_d_seconds", "1 label, 15 buckets",
                                      { "op" }, require("shmprom_bench.update").BUCKETS15)
    }
    server {
        listen 127.0.0.1:$port;
        location = /fill {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                local J = require "shmprom_bench.json"
                local d = ngx.shared.peer_d
                local from, to = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
                if ngx.var.arg_h == "1" then
                    F.fill_hist(bench_h, from, to)
                else
                    F.fill_short(bench_c, from, to)
                end
                peer_prom:metric_data()
                ngx.say(J.encode({ free = d:free_space(), capacity = d:capacity(),
                                   errors = d:get("nginx_metric_errors_total") or 0 }))
            }
        }
    }
}
EOC
    my $nx = nginx_start(name => 'd-peer', conf => $conf, ready => "http://127.0.0.1:$port/fill?from=0&to=0",
                         workers => 2);
    # the first series and the metrics' one-off keys are in (the ready probe)
    my $f0 = http_get_json("http://127.0.0.1:$port/fill?from=0&to=0", 30);
    my $f1 = http_get_json("http://127.0.0.1:$port/fill?from=1&to=$N", 300);
    my $f2 = http_get_json("http://127.0.0.1:$port/fill?from=1&to=$NH&h=1", 300);
    nginx_stop($nx);
    die "(d) peer: its error metric reads $f2->{errors}\n" if $f2->{errors};
    %peer = (counter => ($f0->{free} - $f1->{free}) / $N, histogram => ($f1->{free} - $f2->{free}) / $NH,
             capacity => $f0->{capacity});
    logmsg sprintf('(d) peer: %.1f B per counter series, %.0f B per histogram label set',
                   $peer{counter}, $peer{histogram});
    $summary{'peer counter'} = $peer{counter};
    $summary{'peer histogram'} = $peer{histogram};
}

my $md = "## (d) Zone bytes per series\n\n";
$md .= "nginx with 2 workers, `shmprom.new{ zone = \"bench_d\", size = SIZE }` (planes default: "
     . "one per worker = 2, plus the shared plane, and one spare per plane for the livesum gauge "
     . "shares of workers without a plane; the last row sets `planes = 4`, two per worker, the "
     . "default until 26 Nov 2026, so that the new workers of a reload find planes free while the "
     . "old ones finish). **first series**: the used bytes the first series of the family took "
     . "(one-off costs, such as the key arena's first block aligned after the family's strings, "
     . "included). **used delta / N**: `shmprom_zone_bytes{type=\"used\"}` after the first series "
     . "and after N more counter series "
     . "`bench_d_total{a,b}` with 2 short label values (hex, up to 3 characters each: "
     . "`{a=\"fff\",b=\"18\"}`). **zone / capacity**: the zone size over "
     . "`shmprom_series_capacity` (read before filling). Then the zone is filled until the first "
     . "series is refused: **stored** = label sets actually held then (the counters plus the "
     . "10k histogram series of 1 label and 15 buckets, measured by their own used delta, that "
     . "went in before; the table's slots are the limit, one per label set). Target: 64 B or less per counter series.\n\n";
$md .= md_table([ 'zone', 'worker planes (+ shared)', 'first series (B)', 'N', 'used delta / N (B)', 'target', 'series_capacity',
                  'zone / capacity (B)', 'target', 'stored until refused', 'zone / stored (B)',
                  'histogram series, 15 buckets (B)' ], @rows);
if ($PEER) {
    $md .= sprintf("\nPeer (nginx-lua-prometheus) **measured here**: nginx with 2 workers, "
                   . "`lua_shared_dict peer_d 256m`, the same %s counter series (2 short labels) and "
                   . "%s histogram label sets (1 label, 15 buckets: 18 sample lines each): %.1f B per "
                   . "counter series and %.0f B per histogram label set of the dict's free space (whole "
                   . "free pages, read after the "
                   . "filling worker synced its counters): %.1fx and %s shmprom's used bytes in "
                   . "the 32m zone above. anchors.md, for comparison: about 384 B per counter series, "
                   . "500 B per histogram series.\n\n",
                   fmt_num($N), fmt_num($NH), $peer{counter}, $peer{histogram},
                   $peer{counter} / $summary{'32m used'},
                   $summary{'32m histogram'} ? sprintf('%.1fx', $peer{histogram} / $summary{'32m histogram'})
                                             : 'n/a (no shmprom histogram figure)');
} else {
    $md .= "\nPeer (nginx-lua-prometheus) **from anchors.md**: about 384 B per counter series, 500 B "
         . "per histogram series; a 10 MB dict holds about 21k series. Set PEER_LUA_PATH to measure "
         . "it side by side.\n\n";
}
write_fragment('d', $md);
