# Issue 7.1: 20 reloads (HUP) during sustained load. Every reload waits for
# the complete new set of workers (ShmpromTest::reload). Requests counted in
# the content phase (before the response is sent) and in the log phase must
# both equal the responses the client received; the error log stays free of
# [error]/[crit]/[alert]/[emerg].
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)"
    unless -e $LIB || $ENV{SHMPROM_LUA_PATH};

my $t_start  = time;
my $RELOADS  = 20;
my $REQUESTS = 30_000;
my $CONC     = 6;
# one reload after every STEP responses: the 20 reloads are spread over
# the first 20 * STEP responses, the rest of the load runs after them.
# Each request sleeps 2 ms in the content phase, so the load cannot run
# faster than CONC / 2 ms = 3000 req/s: it lasts 10 s at least, and the 20
# reloads (about 0.2 s each here) all happen while it runs.
my $STEP     = 1_000;

my $n = ShmpromTest->new(
    workers     => 2,
    listen      => 'reuseport',
    init        => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t070", size = "8m" }
        m_content = metrics:counter("t_content_total", "Requests counted in the content phase.", {"status"})
        m_log     = metrics:counter("t_log_total", "Requests counted in the log phase.", {"status"})
        m_gen     = metrics:counter("t_generation_total", "Requests by worker generation.", {"gen"})
        ngx.update_time()
        generation = string.format("%.3f", ngx.now())  -- one per config load
LUA
    init_worker => '        metrics:init_worker()',
    server      => <<'NGX',
        location = /x {
            content_by_lua_block {
                ngx.sleep(0.002)
                local ok, err = m_content:inc(1, {"200"})
                if not ok then ngx.log(ngx.ERR, "m_content:inc failed: ", err) end
                ngx.say("ok")
            }
            log_by_lua_block {
                local ok, err = m_log:inc(1, {ngx.var.status})
                if not ok then ngx.log(ngx.ERR, "m_log:inc failed: ", err) end
                ok, err = m_gen:inc(1, {generation})
                if not ok then ngx.log(ngx.ERR, "m_gen:inc failed: ", err) end
            }
        }
        location = /metrics {
            content_by_lua_block { metrics:collect() }
        }
NGX
);

$n->start_ok('nginx starts');

sub scrape { return $n->metrics }

my @reloads;    # [ responses at HUP, responses when the new workers answered, seconds ]
my $r = $n->load(requests => $REQUESTS, concurrency => $CONC, path => '/x', timeout => 50,
                 during => sub {
    my ($ctl) = @_;
    for my $i (1 .. $RELOADS) {
        $ctl->wait_done($i * $STEP, timeout => 30) or die "load stalled before reload $i\n";
        my $at = $ctl->done;
        my $t = time;
        $n->reload(timeout => 15);
        push @reloads, [ $at, $ctl->done, time - $t, $ctl->finished ? 1 : 0 ];
    }
    return scalar @reloads;
});

diag sprintf('load: %d responses in %.1f s (%.0f req/s), %d connections, %d retries, %d errors',
             $r->{answered}, $r->{elapsed}, $r->{rate}, $r->{connections}, $r->{retries}, $r->{errors});
diag sprintf('reloads: %d, each %.2f s on average; HUPs after %s responses', scalar @reloads,
             (@reloads ? (eval { my $s = 0; $s += $_->[2] for @reloads; $s / @reloads }) : 0),
             join(',', map { $_->[0] } @reloads));

is(scalar @reloads, $RELOADS, "$RELOADS reloads done");
my @during = grep { !$_->[3] && $_->[1] < $REQUESTS } @reloads;
is(scalar @during, $RELOADS, 'every reload finished while the load was still running');
is($r->{ok}, $REQUESTS, "client got $REQUESTS x 200") or diag explain $r->{status};
is($r->{errors}, 0, 'no client errors') or diag explain $r->{child_errors};

ok($n->wait_old_workers_gone(timeout => 20), 'old workers of every generation exited');

# the log phase runs after the response has gone out: wait for it
my $p;
my $settled = wait_until(sub {
    $p = scrape() or return 0;
    metric_sum($p, 't_log_total') >= $r->{ok};
}, timeout => 15);
ok($settled, 'log-phase counter caught up');
$p ||= { list => [], samples => {} };
my $content = metric_sum($p, 't_content_total');
my $logged  = metric_sum($p, 't_log_total');
is($content, $r->{ok}, "content-phase count == responses received ($content)");
is($logged, $r->{ok}, "log-phase count == responses received ($logged)");
is(metric_value($p, 't_log_total', status => '200'), $r->{ok}, 'every logged request has status 200');
my @gens = grep { $_->[0] eq 't_generation_total' } @{ $p->{list} };
cmp_ok(scalar @gens, '>=', 2, 'requests served by ' . scalar(@gens) . ' worker generations');
is(metric_sum($p, 't_generation_total'), $r->{ok}, 'per-generation counts add up');
is(metric_sum($p, 'shmprom_series_dropped_total'), 0, 'no series dropped');

# stable: a later scrape says the same
my $p2 = scrape();
is($p2 ? metric_sum($p2, 't_content_total') : -1, $content, 'still exact on a later scrape');

my @bad = $n->error_lines;
is(scalar @bad, 0, 'no [error]/[crit]/[alert]/[emerg] in the error log') or diag join "\n", @bad[0 .. ($#bad < 20 ? $#bad : 19)];
ok($n->stop, 'nginx stops gracefully');

diag sprintf('070-reloads.t total %.1f s', time - $t_start);
done_testing;
