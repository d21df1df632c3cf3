# Issue 7.4: a tiny zone (256k) filled up.
#  - new series are refused with a clear error and counted, exactly, in
#    shmprom_series_dropped_total{family}
#  - shmprom_zone_fill_ratio{region} shows which region ran out: the
#    table's slots for short counters, the cells for a zone of histograms
#    (a second zone), where the slots stay far from full
#  - the refusals are logged at a bounded rate (about one line per second
#    per worker)
#  - series that existed before stay exact while the zone is full
#  - /metrics renders (and passes promtool), workers keep serving (all 200)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempfile);
use POSIX qw(ceil);
use Time::HiRes qw(time sleep);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)"
    unless -e $LIB || $ENV{SHMPROM_LUA_PATH};

my $t_start = time;
my $WORKERS = 2;

my $n = ShmpromTest->new(
    workers     => $WORKERS,
    listen      => 'reuseport',
    init        => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t073", size = "256k" }
        m_fill   = metrics:counter("t_fill_total", "Filler series, one per id.", {"id"})
        m_keep   = metrics:counter("t_keep_total", "Series made before the zone fills.", {"k"})
        m_hist   = metrics:histogram("t_keep_seconds", "Histogram made before the zone fills.", {"k"}, {0.1, 1})
        m_served = metrics:counter("t_served_total", "Requests to /keep.")
        hmetrics = shmprom.new{ zone = "t073h", size = "256k" }
        local b19 = {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4,
                     0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 10}
        m_wide   = hmetrics:histogram("t_wide_seconds", "19 buckets: 21 cells a label set.", {"id"}, b19)
        -- the same size shared for label sets of 21 cells
        smetrics = shmprom.new{ zone = "t073s", size = "256k", cells_per_series = 21 }
        m_wide_s = smetrics:histogram("t_wide_seconds", "19 buckets: 21 cells a label set.", {"id"}, b19)
LUA
    init_worker => '        metrics:init_worker(); hmetrics:init_worker(); smetrics:init_worker()',
    server      => <<'NGX',
        # new series ids from..to in t_fill_total: answers "ok failed", the
        # first error in X-Err
        location = /fill {
            content_by_lua_block {
                local a, b = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
                local good, bad, first = 0, 0, nil
                for i = a, b do
                    local ok, err = m_fill:inc(1, { "id" .. i })
                    if ok then good = good + 1 else bad = bad + 1; first = first or err end
                end
                if first then ngx.header["X-Err"] = first end
                ngx.say(good, " ", bad)
            }
        }
        location = /keep {
            content_by_lua_block {
                local ok1, e1 = m_keep:inc(1, { "a" })
                local ok2, e2 = m_keep:inc(2, { "b" })
                local ok3, e3 = m_hist:observe(0.5, { "a" })
                local ok4, e4 = m_served:inc()
                if not (ok1 and ok2 and ok3 and ok4) then
                    ngx.status = 500
                    ngx.say(e1 or e2 or e3 or e4)
                    return
                end
                ngx.say("ok")
            }
        }
        location = /keepnew {
            content_by_lua_block {
                local ok, err = m_keep:inc(1, { ngx.var.arg_k })
                ngx.say(ok and "ok" or ("err " .. tostring(err)))
            }
        }
        location = /metrics {
            content_by_lua_block { metrics:collect() }
        }
        # histogram label sets ids from..to in the second zone (?z=s: the
        # third): "ok failed"
        location = /hfill {
            content_by_lua_block {
                local a, b = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
                local h = ngx.var.arg_z == "s" and m_wide_s or m_wide
                local good, bad = 0, 0
                for i = a, b do
                    if h:observe(0.01, { "h" .. i }) then good = good + 1 else bad = bad + 1 end
                end
                ngx.say(good, " ", bad)
            }
        }
        location = /hmetrics {
            content_by_lua_block { hmetrics:collect() }
        }
        location = /smetrics {
            content_by_lua_block { smetrics:collect() }
        }
NGX
);

$n->start_ok('nginx starts with a 256k zone');
my @pids0 = $n->worker_pids;

my $last_body = '';
sub scrape {
    my $r = $n->get('/metrics');
    $last_body = $r->{body};
    return undef unless $r->{status} == 200;
    return eval { parse_metrics($r->{body}) };
}

# ---------------------------------------------------------------- before
my $keep_n = 0;
{
    my $r = $n->load(requests => 500, concurrency => 2, path => '/keep');
    is($r->{ok}, 500, '500 /keep requests before the zone fills');
    $keep_n += $r->{ok};
}
my $p0 = scrape();
ok($p0, '/metrics parses');
my $cap = metric_value($p0, 'shmprom_series_capacity') // 0;
cmp_ok($cap, '>', 10, "shmprom_series_capacity = $cap");
diag sprintf('zone: %s of %s bytes used, series capacity %d',
             metric_value($p0, 'shmprom_zone_bytes', type => 'used') // '?',
             metric_value($p0, 'shmprom_zone_bytes', type => 'capacity') // '?', $cap);

# ---------------------------------------------------------------- fill
my ($next, $good, $bad, $first_err) = (0, 0, 0, undef);
my $CHUNK = 200;
my $max_chunks = int(2 * $cap / $CHUNK) + 10;
for my $i (1 .. $max_chunks) {
    my $r = $n->get("/fill?from=$next&to=" . ($next + $CHUNK - 1));
    $next += $CHUNK;
    is($r->{status}, 200, "fill chunk $i answers 200") unless $r->{status} == 200;
    my ($g, $b) = $r->{body} =~ /^(\d+) (\d+)/ or last;
    $good += $g;
    $bad  += $b;
    $first_err //= $r->{headers}{'x-err'};
    last if $b > 0;
}
cmp_ok($bad, '>', 0, "the zone filled up: $good series made, then refusals");
like($first_err // '', qr/t_fill_total: .*zone full/i, 'the refusal is a clear error naming the family')
    and diag "error: $first_err";
cmp_ok($good, '<=', $cap, 'no more series than the capacity');

# ---------------------------------------------------------------- full, under load
# /keep load while /fill keeps asking for new series for about 3 s (the
# /keep load may end sooner; it only has to meet a full zone)
my $mark = $n->log_mark;
my ($t_full0, $t_full1);
my ($refused_during, $chunks_during) = (0, 0);
my $load = $n->load(requests => 4000, concurrency => 4, path => '/keep', timeout => 40, during => sub {
    my ($ctl) = @_;
    $t_full0 = time;
    # spread over 3 s (the log limit is per second): one request every
    # 20 ms, at most 300 of them
    for my $i (1 .. 300) {
        last if time - $t_full0 > 3;
        sleep 0.02 if $i > 1;
        my $r = $n->get("/fill?from=$next&to=" . ($next + 49));
        $next += 50;
        $chunks_during++;
        my ($g, $b) = $r->{body} =~ /^(\d+) (\d+)/;
        $good += $g // 0;
        $bad += $b // 0;
        $refused_during += $b // 0;
    }
    $t_full1 = time;
});
my $full_secs = $t_full1 - $t_full0;
is($load->{ok}, 4000, 'workers keep serving: 4000 x 200 while the zone is full')
    or diag explain $load->{status};
is($load->{errors}, 0, 'no client errors');
$keep_n += $load->{ok};
cmp_ok($refused_during, '>=', $chunks_during * 50 - 5, sprintf('%d new series refused in %.1f s (%d requests)',
       $refused_during, $full_secs, $chunks_during));

# one new series in another family: refused and counted for that family
my $kn = $n->get('/keepnew?k=brand-new');
like($kn->{body}, qr/^err .*zone full/i, 'a new series of t_keep_total is refused too') or diag $kn->{body};

# ---------------------------------------------------------------- after
my $p = scrape();
ok($p, '/metrics renders and parses with the zone full') or diag substr($last_body, 0, 2000);
$p ||= { list => [], samples => {}, type => {} };

is(metric_value($p, 'shmprom_series_dropped_total', family => 't_fill_total'), $bad,
   "shmprom_series_dropped_total{family=\"t_fill_total\"} == $bad refused updates");
is(metric_value($p, 'shmprom_series_dropped_total', family => 't_keep_total'), 1,
   'shmprom_series_dropped_total{family="t_keep_total"} == 1');
is(metric_value($p, 'shmprom_series_dropped_total', family => 't_keep_seconds'), 0, 'other families: 0 dropped');
is(metric_value($p, 'shmprom_errors_total', kind => 'series_dropped'), $bad + 1,
   'shmprom_errors_total{kind="series_dropped"} counts them all');
is(metric_value($p, 'shmprom_series', family => 't_fill_total'), $good, "shmprom_series{family=\"t_fill_total\"} == $good");
my @fill = metric_series($p, 't_fill_total');
is(scalar @fill, $good, 'every series made is in the output');
is(scalar(grep { $_->[1] != 1 } @fill), 0, 'each at 1');

# existing series stay exact
is(metric_value($p, 't_keep_total', k => 'a'), $keep_n, "t_keep_total{k=\"a\"} == $keep_n");
is(metric_value($p, 't_keep_total', k => 'b'), 2 * $keep_n, 't_keep_total{k="b"} exact');
is(metric_value($p, 't_keep_seconds_count', k => 'a'), $keep_n, 'histogram _count exact');
is(metric_value($p, 't_keep_seconds_bucket', k => 'a', le => '+Inf'), $keep_n, 'histogram +Inf exact');
is(metric_value($p, 't_keep_seconds_bucket', k => 'a', le => '0.1'), 0, 'histogram le=0.1 exact');
is(metric_value($p, 't_keep_seconds_sum', k => 'a'), 0.5 * $keep_n, 'histogram _sum exact');
is(metric_value($p, 't_served_total'), $keep_n, 'unlabelled counter exact');
is(metric_value($p, 't_keep_total', k => 'brand-new'), undef, 'the refused series is not in the output');
my $used = metric_value($p, 'shmprom_zone_bytes', type => 'used') // 0;
my $zcap = metric_value($p, 'shmprom_zone_bytes', type => 'capacity') // 0;
cmp_ok($used, '<=', $zcap, "zone bytes used $used <= capacity $zcap");
my %fill = map { $_ => metric_value($p, 'shmprom_zone_fill_ratio', region => $_) } qw(slots keys cells);
is($fill{slots}, 1, 'shmprom_zone_fill_ratio{region="slots"} = 1: short counters run the slots out');
for my $r (qw(keys cells)) {
    ok(defined $fill{$r} && $fill{$r} >= 0 && $fill{$r} < 1, "shmprom_zone_fill_ratio{region=\"$r\"} = "
       . ($fill{$r} // 'missing') . ': room left');
}

# ---------------------------------------------------------------- a zone of histograms
# hfill(query, metrics) -> (label sets made, refused, parsed metrics, fill
# ratio by region): new histogram label sets 100 at a time until one is
# refused (at most 10k)
sub hfill {
    my ($q, $metrics) = @_;
    my ($good, $bad) = (0, 0);
    for my $i (0 .. 99) {
        my $r = $n->get("/hfill?$q&from=" . (100 * $i) . '&to=' . (100 * $i + 99));
        my ($g, $b) = $r->{body} =~ /^(\d+) (\d+)/ or last;
        $good += $g;
        $bad += $b;
        last if $b > 0;
    }
    my $p = eval { parse_metrics($n->get($metrics)->{body}) } || { list => [], samples => {}, type => {} };
    my %fill = map { $_ => metric_value($p, 'shmprom_zone_fill_ratio', region => $_) // -1 } qw(slots keys cells);
    return ($good, $bad, $p, \%fill);
}
my ($hgood, $hbad, $hp, $hf) = hfill('z=h', '/hmetrics');
my %hfill = %$hf;
cmp_ok($hbad, '>', 0, "the histogram zone filled up: $hgood label sets, then refusals");
cmp_ok($hfill{cells}, '>', 0.95, "cells ran out: shmprom_zone_fill_ratio{region=\"cells\"} = $hfill{cells}");
cmp_ok($hfill{slots}, '<', 0.5, "the slots did not: shmprom_zone_fill_ratio{region=\"slots\"} = $hfill{slots}");
is(metric_value($hp, 'shmprom_series_dropped_total', family => 't_wide_seconds'), $hbad,
   'the refused histogram label sets are counted');

# the same size opened with cells_per_series = 21: the table and the cells
# run out together, and it holds more than twice as many label sets
my ($sgood, $sbad, $sp, $sf) = hfill('z=s', '/smetrics');
my %sfill = %$sf;
cmp_ok($sbad, '>', 0, "the zone with cells_per_series = 21 filled up: $sgood label sets, then refusals");
cmp_ok($sgood, '>', 2 * $hgood, "it holds more than twice as many as the default shares ($hgood)");
cmp_ok($sfill{slots}, '>', 0.9, "its slots ran out too: shmprom_zone_fill_ratio{region=\"slots\"} = $sfill{slots}");
cmp_ok($sfill{cells}, '>', 0.9, "and its cells: shmprom_zone_fill_ratio{region=\"cells\"} = $sfill{cells}");
is(metric_value($sp, 'shmprom_series_dropped_total', family => 't_wide_seconds'), $sbad,
   'its refused label sets are counted');

# the log: refusals logged at a bounded rate
my @lines = grep { /zone full/ } split /\n/, $n->error_log(since => $mark);
my $bound = $WORKERS * (ceil($full_secs) + 1);
cmp_ok(scalar @lines, '<=', $bound, sprintf('%d "zone full" log lines for %d refusals in %.1f s (bound %d: 1/s/worker)',
       scalar @lines, $refused_during + 1, $full_secs, $bound));
cmp_ok(scalar @lines, '>=', 1, 'the refusals are logged');
ok((grep { /similar messages suppressed/ } @lines), 'suppressed lines are counted in the next one')
    or diag join "\n", @lines;
my @other = $n->error_lines(ignore => qr/zone full/);
is(scalar @other, 0, 'no other [error]/[crit]/[alert] lines') or diag join "\n", @other[0 .. ($#other < 20 ? $#other : 19)];

# promtool
SKIP: {
    my ($dir) = grep { length && -x "$_/promtool" } split /:/, $ENV{PATH} // '';
    skip 'promtool not on PATH', 1 unless $dir;
    my ($fh, $file) = tempfile('shmprom-metrics-XXXXXX', TMPDIR => 1, UNLINK => 1);
    print {$fh} $last_body;
    close $fh;
    my $out = `'$dir/promtool' check metrics < '$file' 2>&1`;
    is($?, 0, 'promtool check metrics passes on the full zone') or diag $out;
}

is_deeply([ $n->worker_pids ], \@pids0, 'same workers as at the start (none crashed)');
ok($n->stop, 'nginx stops gracefully');
diag sprintf('073-full.t total %.1f s', time - $t_start);
done_testing;
