#!/usr/bin/perl
# ngx_http_shmprom_module (the gateway preset recorded from C) through
# reloads and worker kills, on a real nginx with 2 workers:
#
#   1. 20,000 requests at concurrency 6 with 10 reloads (HUP) during the
#      load: dfs_gateway_requests_total{op="read",status="200"} equals the
#      responses the client got, exactly; requests in flight back to 0;
#   2. six requests held in their content phase are 6 in flight; both
#      workers killed with SIGKILL: in flight drops to 0 (livesum: a dead
#      worker's share goes with it), nothing else moves;
#   2b. a reload while old workers hold requests: the new workers find the
#      planes held and record in flight through spares; one killed -9 takes
#      its share with it; once the old workers exit the new ones take the
#      planes and their shares move along; in flight back to 0, every
#      request counted;
#   3. gateway.log() in a location the module records does nothing (no
#      request counted twice) and says so once per worker;
#   4. a reload to a configuration that turns the module on without the
#      preset's init(): each worker says that nothing is recorded.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
my $MOD = repo_root() . '/target/release/ngx_http_shmprom_module.so';
plan skip_all => "$LIB or $MOD not built (make build)" unless -f $LIB && -f $MOD;

my $t_start  = time;
my $REQUESTS = 20_000;
my $RELOADS  = 10;
my $STEP     = 1_000;
my $CONC     = 6;
my $HELD     = 6;

my $INIT = <<'LUA';
        gateway = require("resty.shmprom.gateway").init{
            zone = "t042", size = "8m", module = true,
        }
LUA
my $n = ShmpromTest->new(
    workers     => 2,
    ports       => 2,
    listen      => 'reuseport',
    main        => "load_module $MOD;",
    init        => $INIT,
    init_worker => '        gateway.init_worker()',
    server      => <<'NGX',
        shmprom_gateway on;
        location = /x {
            content_by_lua_block { ngx.sleep(0.002) ngx.say("ok") }
        }
        location = /hold {
            content_by_lua_block { ngx.sleep(30) ngx.say("late") }
        }
        location = /holdpid {
            lua_check_client_abort on;
            content_by_lua_block {
                ngx.on_abort(function() ngx.exit(499) end)
                ngx.say(ngx.worker.pid())
                ngx.flush(true)
                ngx.sleep(30)
            }
        }
        location = /lua {
            log_by_lua_block { gateway.log() }
            return 200 "ok\n";
        }
NGX
    servers     => <<'NGX',
    server {
        listen 127.0.0.1:$PORT2;
        location = /metrics { content_by_lua_block { gateway.collect() } }
    }
NGX
);

$n->start_ok('nginx starts with ngx_http_shmprom_module');

sub scrape { return $n->metrics('/metrics', 2) }
sub reads { my ($p) = @_; return metric_value($p, 'dfs_gateway_requests_total', op => 'read', status => '200') // 0 }
sub in_flight { my ($p) = @_; return metric_value($p, 'dfs_gateway_requests_in_flight') }

# ------------------------------------------------------------ 1. reloads

my $mark = $n->log_mark;
my $p0 = scrape();
ok($p0, 'the metrics server answers');
my $before = reads($p0 || { samples => {} });
my @reloads;
my $r = $n->load(requests => $REQUESTS, concurrency => $CONC, path => '/x', timeout => 60,
                 during => sub {
    my ($ctl) = @_;
    for my $i (1 .. $RELOADS) {
        $ctl->wait_done($i * $STEP, timeout => 30) or die "load stalled before reload $i\n";
        $n->reload(timeout => 15);
        push @reloads, [ $ctl->done, $ctl->finished ? 1 : 0 ];
    }
    return;
});
diag sprintf('load: %d responses in %.1f s (%.0f req/s); HUPs after %s responses',
             $r->{answered}, $r->{elapsed}, $r->{rate}, join(',', map { $_->[0] } @reloads));
is(scalar(grep { !$_->[1] } @reloads), $RELOADS, "$RELOADS reloads while the load ran");
is($r->{ok}, $REQUESTS, "client got $REQUESTS x 200") or diag explain $r->{status};
ok($n->wait_old_workers_gone(timeout => 20), 'old workers of every generation exited');
my $p;
ok(wait_until(sub { $p = scrape() or return 0; reads($p) - $before >= $r->{ok} && (in_flight($p) // -1) == 0 },
              timeout => 15), 'the log phase of every response has run');
$p ||= { samples => {}, list => [] };
is(reads($p) - $before, $r->{ok}, "read/200 counted once per response ($r->{ok}) across $RELOADS reloads");
is(in_flight($p), 0, 'none in flight after the load');
is(metric_value($p, 'dfs_gateway_request_duration_seconds_count', op => 'read'),
   metric_sum($p, 'dfs_gateway_requests_total', op => 'read'), 'duration _count == read requests');
is(metric_sum($p, 'shmprom_errors_total'), 0, 'no shmprom errors');
my @bad = $n->error_lines(since => $mark);
is(scalar @bad, 0, 'no [error]/[crit]/[alert] lines') or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];

# ------------------------------------------------------------ 2. kill -9

$mark = $n->log_mark;
my $reads0 = reads(scrape() || { samples => {} });
my @held;
for (1 .. $HELD) {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $n->port, Proto => 'tcp', Timeout => 5)
        or die "connect: $!";
    $s->autoflush(1);
    print {$s} "GET /hold HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    push @held, $s;
}
ok(wait_until(sub { my $q = scrape(); $q && (in_flight($q) // 0) == $HELD }, timeout => 10),
   "$HELD held requests are in flight");
my @victims = $n->worker_pids;
$n->kill_worker($_, 'KILL', timeout => 15) for @victims;
pass('both workers killed with SIGKILL and replaced: ' . join(' ', @victims));
my $q;
ok(wait_until(sub { $q = scrape(); $q && (in_flight($q) // -1) == 0 }, timeout => 10),
   'in flight back to 0: the killed workers\' requests went with them')
    or diag 'in flight: ' . ($q ? in_flight($q) // 'absent' : 'no scrape');
is(reads($q || { samples => {} }), $reads0, 'the killed requests were not counted as served');
for my $s (@held) {
    local $/;
    my $resp = <$s> // '';
    unlike($resp, qr/late/, 'a held request got no response from its killed worker');
    close $s;
}
my $r2 = $n->load(requests => 1000, concurrency => 4, path => '/x');
is($r2->{ok}, 1000, '1000 requests after the kills');
ok(wait_until(sub { $q = scrape(); $q && reads($q) - $reads0 == 1000 && (in_flight($q) // -1) == 0 },
              timeout => 10), 'the new workers count exactly (1000) and none is left in flight');
@bad = $n->error_lines(since => $mark, ignore => qr/exited on signal 9/);
is(scalar @bad, 0, 'no error lines but the kills') or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];

# ------------------------------------------------------------ 2b. reload overlap

sub spares { my ($p, $state) = @_; return metric_value($p, 'shmprom_plane_spares', state => $state) // -1 }
sub planes { my ($p, $state) = @_; return metric_value($p, 'shmprom_planes', state => $state) // -1 }

$mark = $n->log_mark;
$q = scrape();
my $reads_o = reads($q);
is(planes($q, 'total'), 2, 'one plane per worker');
is(spares($q, 'total'), 2, 'one spare per plane');
my ($old_socks, $old_held) = $n->hold('/holdpid');
ok(keys(%$old_held) == 2, 'both workers hold requests: ' . join(', ', map { "$_=$old_held->{$_}" } sort keys %$old_held));
$n->reload(timeout => 15);    # the old workers stay until their requests end
is(scalar($n->old_worker_pids), 2, 'old workers still running');
my $ro = $n->load(requests => 1000, concurrency => 4, path => '/x');
is($ro->{ok}, 1000, '1000 requests through the new workers');
ok(wait_until(sub { $q = scrape(); $q && spares($q, 'in_use') == 2 && planes($q, 'in_use') == 2 }, timeout => 10),
   'the old workers hold the planes, the new ones a spare each')
    or diag 'planes ' . planes($q, 'in_use') . ', spares ' . spares($q, 'in_use');
my ($new_socks, $new_held) = $n->hold('/holdpid');
ok(keys(%$new_held) == 2, 'both new workers hold requests: ' . join(', ', map { "$_=$new_held->{$_}" } sort keys %$new_held));
my $inf = @$old_socks + @$new_socks;
ok(wait_until(sub { $q = scrape(); $q && (in_flight($q) // -1) == $inf }, timeout => 10), "$inf in flight, old and new")
    or diag 'in flight: ' . (in_flight($q) // 'absent');
my ($victim) = sort { $new_held->{$b} <=> $new_held->{$a} } keys %$new_held;
my @repl = $n->kill_worker($victim, 'KILL', timeout => 15);
$inf -= $new_held->{$victim};
ok(wait_until(sub { $q = scrape(); $q && (in_flight($q) // -1) == $inf }, timeout => 10),
   "new worker $victim killed -9 (replaced by @repl): its $new_held->{$victim} in flight went with it")
    or diag 'in flight: ' . (in_flight($q) // 'absent');
close $_->[0] for @$old_socks;
ok($n->wait_old_workers_gone(timeout => 15), 'the old workers exit once their requests end');
$inf -= @$old_socks;
ok(wait_until(sub { $q = scrape(); $q && planes($q, 'in_use') == 2 && spares($q, 'in_use') == 0
                    && (in_flight($q) // -1) == $inf }, timeout => 10),
   "the new workers took the planes, gave the spares back, and keep their $inf in flight")
    or diag 'planes ' . planes($q, 'in_use') . ', spares ' . spares($q, 'in_use') . ', in flight ' . (in_flight($q) // 'absent');
close $_->[0] for @$new_socks;
ok(wait_until(sub { $q = scrape(); $q && (in_flight($q) // -1) == 0 }, timeout => 10), 'all released: none in flight');
my $ro2 = $n->load(requests => 1000, concurrency => 4, path => '/x');
# the held requests had answered 200 (their pid) before they were cut: the
# ones whose worker lived on count as reads too, the killed worker's do not
my $held_done = @$old_socks + @$new_socks - $new_held->{$victim};
my $want = $ro->{ok} + $ro2->{ok} + $held_done;
ok(wait_until(sub { $q = scrape(); $q && reads($q) - $reads_o >= $want }, timeout => 10), 'counted');
is(reads($q) - $reads_o, $want, "read/200 exact through the overlap (shared plane) and after (planes): "
   . "$ro->{ok} + $ro2->{ok} + $held_done held");
@bad = $n->error_lines(since => $mark, ignore => qr/exited on signal 9/);
is(scalar @bad, 0, 'no error lines but the kill') or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];

# ------------------------------------------------------------ 3. no double count

$mark = $n->log_mark;
my $lua0 = reads(scrape() || { samples => {} });
my $r3 = $n->load(requests => 200, concurrency => 4, path => '/lua');
is($r3->{ok}, 200, '200 requests to a location that also calls gateway.log()');
ok(wait_until(sub { $q = scrape(); $q && reads($q) - $lua0 >= 200 }, timeout => 10), 'counted');
is(reads($q || { samples => {} }) - $lua0, 200, 'each counted once: gateway.log() records nothing when the module does');
my @said = grep { /ngx_http_shmprom_module records the requests/ } $n->error_lines(since => $mark);
cmp_ok(scalar @said, '>=', 1, 'gateway.log() says it does nothing');
cmp_ok(scalar @said, '<=', 2, '... at most once per worker (' . scalar(@said) . ')');

# ------------------------------------------------------------ 4. no init

$mark = $n->log_mark;
$n->set_config(init => '', init_worker => '', servers => '');
$n->reload(timeout => 15, wait_old => 1);
my $r4 = $n->get('/x');
is($r4->{status}, 200, 'without the preset the gateway still serves');
my @warn;
ok(wait_until(sub { @warn = grep { /did not attach/ } $n->error_lines(since => $mark); @warn == 2 },
              timeout => 10), 'each new worker says the module is on but not attached')
    or diag join "\n", $n->error_lines(since => $mark);

ok($n->stop, 'nginx stops gracefully');
diag sprintf('042-gateway-module-reload.t total %.1f s', time - $t_start);
done_testing;
