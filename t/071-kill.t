# Issue 7.2: kill -9 of workers, several times, during load.
#  - every completed response is counted exactly once: the content phase
#    counts before ngx.say, so no response can reach the client uncounted;
#    a request counted whose response died with its worker is a request the
#    client saw fail (a re-sent or failed request), so
#        responses <= counted <= responses + re-sends + failures
#  - the log-phase counter's shortfall (requests whose worker died before
#    their log phase) is reported as information;
#  - the livesum in-flight gauge returns to 0 once the load is over;
#  - m:check() (the zone's consistency check) passes afterwards.
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
my $KILLS    = 6;
my $REQUESTS = 24_000;
my $CONC     = 6;
my $STEP     = 2_500;    # a kill after every STEP responses

my $n = ShmpromTest->new(
    workers     => 2,
    listen      => 'reuseport',
    init        => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t071", size = "8m" }
        m_content  = metrics:counter("t_content_total", "Counted in the content phase, before the response.")
        m_log      = metrics:counter("t_log_total", "Counted in the log phase.")
        m_worker   = metrics:counter("t_worker_total", "Content-phase count by worker pid.", {"pid"})
        m_inflight = metrics:gauge("t_in_flight", "Requests in flight.", nil, { mode = "livesum" })
        m_hist     = metrics:histogram("t_work_seconds", "Fixed observation per request.", nil, {0.1, 1})
LUA
    init_worker => '        metrics:init_worker()',
    server      => <<'NGX',
        location = /x {
            access_by_lua_block {
                local ok, err = m_inflight:inc(1)
                if not ok then ngx.log(ngx.ERR, "m_inflight:inc failed: ", err) end
            }
            content_by_lua_block {
                ngx.sleep(0.001)
                local ok, err = m_content:inc()
                if not ok then ngx.log(ngx.ERR, "m_content:inc failed: ", err) end
                ok, err = m_worker:inc(1, { ngx.worker.pid() })
                if not ok then ngx.log(ngx.ERR, "m_worker:inc failed: ", err) end
                ok, err = m_hist:observe(0.5)
                if not ok then ngx.log(ngx.ERR, "m_hist:observe failed: ", err) end
                ngx.say("ok")
            }
            log_by_lua_block {
                local ok, err = m_log:inc()
                if not ok then ngx.log(ngx.ERR, "m_log:inc failed: ", err) end
                ok, err = m_inflight:dec(1)
                if not ok then ngx.log(ngx.ERR, "m_inflight:dec failed: ", err) end
            }
        }
        location = /metrics {
            content_by_lua_block { metrics:collect() }
        }
        location = /check {
            content_by_lua_block {
                local summary, err = metrics:check()
                if not summary then
                    ngx.status = 500
                    ngx.say("check failed: ", err)
                    return
                end
                ngx.say(summary)
            }
        }
NGX
);

$n->start_ok('nginx starts');

sub scrape { return $n->metrics }

my $r0 = $n->get('/check');
chomp $r0->{body};
is($r0->{status}, 200, "consistency check before: $r0->{body}");

my $mark = $n->log_mark;
my @kills;    # [ victim, replacement, responses at the kill ]
my $r = $n->load(requests => $REQUESTS, concurrency => $CONC, path => '/x', timeout => 50,
                 during => sub {
    my ($ctl) = @_;
    for my $i (1 .. $KILLS) {
        $ctl->wait_done($i * $STEP, timeout => 30) or die "load stalled before kill $i\n";
        my @w = $n->worker_pids;
        my $victim = $w[ $i % @w ];
        my $at = $ctl->done;
        my @repl = $n->kill_worker($victim, 'KILL', timeout => 15);
        push @kills, [ $victim, "@repl", $at, $ctl->finished ? 1 : 0 ];
    }
    return;
});

diag sprintf('load: %d responses in %.1f s (%.0f req/s), %d connections, %d re-sends, %d failed',
             $r->{answered}, $r->{elapsed}, $r->{rate}, $r->{connections}, $r->{retries}, $r->{errors});
diag 'kills: ' . join(', ', map { "$_->[0] -> $_->[1] after $_->[2]" } @kills);
is(scalar @kills, $KILLS, "$KILLS workers killed with SIGKILL");
is(scalar(grep { !$_->[3] } @kills), $KILLS, 'every kill happened while the load was running');
is($r->{ok} + $r->{errors}, $REQUESTS, 'every request got a 200 or failed (no other status)')
    or diag explain $r->{status};
cmp_ok($r->{errors}, '<=', $KILLS * $CONC, "failed requests ($r->{errors}) bounded by the in-flight ones at the kills")
    or diag explain $r->{child_errors};

# wait until the surviving workers' log phases have run
my $p;
my $lost_bound = $r->{retries} + $r->{errors};
wait_until(sub {
    $p = scrape() or return 0;
    metric_sum($p, 't_log_total') >= $r->{ok} - $lost_bound
        && (metric_value($p, 't_in_flight') // 1) == 0;
}, timeout => 15);
$p ||= { list => [], samples => {} };

my $content = metric_value($p, 't_content_total') // -1;
my $logged  = metric_value($p, 't_log_total') // -1;
cmp_ok($content, '>=', $r->{ok}, "every completed response was counted (content $content >= responses $r->{ok})");
cmp_ok($content - $r->{ok}, '<=', $lost_bound,
       'counted at most once: content - responses (' . ($content - $r->{ok})
       . ") <= re-sent + failed requests ($lost_bound)");
diag sprintf('log-phase counter: %d (%+d against responses, %+d against the content phase)',
             $logged, $logged - $r->{ok}, $logged - $content);
is(metric_sum($p, 't_worker_total'), $content, 'per-worker counts add up to the content-phase count');
is(metric_value($p, 't_work_seconds_count'), $content, 'histogram _count == content-phase count');
is(metric_value($p, 't_work_seconds_bucket', le => '+Inf'), $content, 'histogram +Inf == _count');
is(metric_value($p, 't_work_seconds_sum'), 0.5 * $content, 'histogram _sum exact');
my @pids = map { $_->[1]{pid} } grep { $_->[0] eq 't_worker_total' } @{ $p->{list} };
my %victims = map { $_->[0] => 1 } @kills;
my @counted_victims = grep { $victims{$_} } @pids;
cmp_ok(scalar @counted_victims, '>=', 1, 'counts of killed workers stay in the output ('
       . scalar(@counted_victims) . " of $KILLS victims)");

my $inflight;
ok(wait_until(sub { my $q = scrape(); $inflight = $q ? metric_value($q, 't_in_flight') : undef;
                    defined $inflight && $inflight == 0 }, timeout => 10),
   'livesum in-flight gauge back to 0 after the load') or diag 't_in_flight = ' . ($inflight // 'absent');

my $chk = $n->get('/check');
chomp $chk->{body};
is($chk->{status}, 200, 'consistency check passes after the kills') or diag $chk->{body};
like($chk->{body}, qr/^ok\b/, "check: $chk->{body}");

# still exact with fresh load after the kills
my $c0 = $content;
my $r2 = $n->load(requests => 2000, concurrency => 4, path => '/x');
is($r2->{ok}, 2000, '2000 more requests after the kills');
my $p2;
wait_until(sub { $p2 = scrape() or return 0; (metric_value($p2, 't_content_total') // 0) >= $c0 + 2000 }, timeout => 10);
is(metric_value($p2 || {samples => {}}, 't_content_total'), $c0 + 2000, 'content-phase counter exact after the kills');

my @bad = $n->error_lines(since => $mark, ignore => qr/exited on signal 9/);
is(scalar @bad, 0, 'no [error]/[crit]/[alert] lines other than the killed workers\'') or diag join "\n", @bad[0 .. ($#bad < 20 ? $#bad : 19)];
my @sig9 = grep { /exited on signal 9/ } $n->error_lines(since => $mark);
is(scalar @sig9, $KILLS, 'nginx logged each killed worker once');
ok($n->stop, 'nginx stops gracefully');

diag sprintf('071-kill.t total %.1f s', time - $t_start);
done_testing;
