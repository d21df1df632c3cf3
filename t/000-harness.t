# Tests of the test harness itself (t/lib/ShmpromTest.pm) against a plain
# nginx + lua module, without shmprom: a lua_shared_dict counter incremented in
# the content phase is the reference the load client's counts are checked against.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use POSIX qw(WNOHANG);
use File::Spec;
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series
                   format_series_key);

my $t_start = time;

# ---------------------------------------------------------------- parser
subtest 'parse_metrics' => sub {
    my $text = <<'EOT';
# HELP a_total A counter with \\ and \n in help.
# TYPE a_total counter
a_total{path="/x",code="200"} 3
a_total{code="500",path="/y \"q\" \\ z\nnl"} 1.5e3
# TYPE g gauge
g -Inf
g2 +Inf
g3 NaN
# HELP h Hist.
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="+Inf"} 2
h_sum 0.25
h_count 2
t{a="1",} 7 1700000000000
# UNIT x seconds
EOT
    my $p = eval { parse_metrics($text) };
    ok($p, 'parses') or diag $@;
    is($p->{type}{a_total}, 'counter', 'TYPE');
    is($p->{help}{a_total}, "A counter with \\ and \n in help.", 'HELP unescaped');
    is(metric_value($p, 'a_total', code => 200, path => '/x'), 3, 'lookup with sorted labels');
    is(metric_value($p, 'a_total', code => 500, path => "/y \"q\" \\ z\nnl"), 1500,
       'escaped label value');
    ok(exists $p->{samples}{'a_total{code="500",path="/y \"q\" \\\\ z\nnl"}'}, 'canonical key re-escaped');
    is(metric_sum($p, 'a_total'), 1503, 'metric_sum');
    is(metric_sum($p, 'a_total', code => 200), 3, 'metric_sum with filter');
    is(metric_sum($p, 'nope'), 0, 'metric_sum of absent metric');
    ok($p->{samples}{g} < 0 && $p->{samples}{g} == -9**9**9, '-Inf');
    ok($p->{samples}{g2} == 9**9**9, '+Inf');
    ok($p->{samples}{g3} != $p->{samples}{g3}, 'NaN');
    is(metric_value($p, 'h_bucket', le => '+Inf'), 2, 'le="+Inf"');
    is(metric_value($p, 't', a => 1), 7, 'trailing comma and timestamp');
    is(scalar(metric_series($p, 'h_bucket')), 2, 'metric_series');
    is(format_series_key('x', {}), 'x', 'key without labels');

    for my $bad ("a{b=\"1\"} 1\na{b=\"1\"} 2\n", "a{b=1} 1\n", "a 1x\n", "a{b=\"\\q\"} 1\n",
                 "# TYPE a foo\n", "1a 1\n", "a{b=\"1\" 1\n", "# EOF\na 1\n") {
        ok(!eval { parse_metrics($bad); 1 }, "rejects: " . join('\n', split /\n/, $bad))
            and note $@;
    }
    my $om = parse_metrics("# TYPE x counter\nx_total 1\n# EOF\n");
    ok($om->{eof}, 'OpenMetrics # EOF seen');
};

# ---------------------------------------------------------------- wait_until
subtest 'wait_until' => sub {
    my $t0 = time; my $i = 0;
    is(wait_until(sub { ++$i >= 3 ? 'yes' : 0 }, timeout => 5), 'yes', 'returns the true value');
    ok(time - $t0 < 1, 'quickly');
    $t0 = time;
    ok(!wait_until(sub { 0 }, timeout => 0.3), 'false on timeout');
    my $el = time - $t0;
    ok($el >= 0.3 && $el < 1.5, "honours the deadline ($el s)");
};

# ---------------------------------------------------------------- nginx
my $n = ShmpromTest->new(
    workers => 2,
    ports   => 2,
    http    => 'lua_shared_dict c 1m;',
    init    => 'harness_init_ran = true',
    server  => <<'EOS',
        location = /x {
            content_by_lua_block {
                ngx.shared.c:incr("n", 1, 0)
                ngx.say("ok")
            }
        }
        location = /count {
            content_by_lua_block { ngx.say(ngx.shared.c:get("n") or 0) }
        }
        location = /pid {
            content_by_lua_block { ngx.say(ngx.worker.pid()) }
        }
        location = /init {
            content_by_lua_block { ngx.say(tostring(harness_init_ran)) }
        }
        location = /nope { return 404; }
        location = /fixed {
            return 200 "fixed-length\n";
        }
        location = /repo {
            return 200 "$REPO|$PREFIX|$PORT2|$host";
        }
EOS
    servers => <<'EOS',
    server {
        listen 127.0.0.1:$PORT2;
        location / { return 200 "second\n"; }
    }
EOS
);

sub count { my $r = $n->get('/count'); die "GET /count: $r->{status} $r->{body}" unless $r->{status} == 200; $r->{body} + 0 }

my $conf = do { open my $fh, '<', $n->conf_path or die; local $/; <$fh> };
like($conf, qr{load_module /usr/lib/nginx/modules/ndk_http_module\.so;}, 'conf loads ndk');
like($conf, qr{load_module /usr/lib/nginx/modules/ngx_http_lua_module\.so;}, 'conf loads lua');
like($conf, qr{^user root root;}m, 'user root when running as root') if $> == 0;
like($conf, qr{lua_package_path\s+"\Q${\ $n->repo}\E/lua/\?\.lua;/usr/share/lua/5\.1/\?\.lua;;"}, 'package path');
like($conf, qr{lua_package_cpath\s+"\Q${\ $n->repo}\E/target/release/\?\.so;;"}, 'package cpath');
unlike($conf, qr/\$(?:PORT\d*|REPO|PREFIX)\b/, 'no placeholder left');
ok(-f $n->repo . '/docs/contract.md', 'repo root found: ' . $n->repo);
isnt($n->port(1), $n->port(2), 'two distinct ports');
ok(index($n->prefix, ($ENV{TMPDIR} && -d $ENV{TMPDIR} ? $ENV{TMPDIR} : '/tmp')) == 0, 'prefix in tmp: ' . $n->prefix);

$n->start;
ok($n->is_running, 'started, master ' . $n->master_pid);
my @w = $n->worker_pids;
is(scalar @w, 2, "two workers: @w");
isnt($_, $n->master_pid, 'worker is not the master') for @w;

{
    my $r = $n->get('/x');
    is($r->{status}, 200, 'GET /x');
    is($r->{body}, "ok\n", 'body');
    is(count(), 1, 'shdict counter 1');
    is($n->get('/init')->{body}, "true\n", 'init_by_lua ran');
    is($n->get('/repo', Host => 'example.test')->{body},
       $n->repo . '|' . $n->prefix . '|' . $n->port(2) . '|example.test', 'placeholders substituted, nginx vars kept');
    is($n->get(['/', 2])->{body}, "second\n", 'second server on $PORT2');
    my $pid = $n->get('/pid')->{body} + 0;
    ok((grep { $_ == $pid } @w), 'request served by one of worker_pids');
}

# ---------------------------------------------------------------- load
{
    my $before = count();
    my $r = $n->load(requests => 5000, concurrency => 8, path => '/x');
    is($r->{ok}, 5000, '5000 x 200 received');
    is($r->{errors}, 0, 'no errors') or diag explain $r;
    is(count() - $before, $r->{ok}, 'server-side counter == responses received');
    diag sprintf('load: 5000 req in %.2f s = %.0f req/s, %d connections, %d retries',
                 $r->{elapsed}, $r->{rate}, $r->{connections}, $r->{retries});
    cmp_ok($r->{connections}, '>=', 8, 'one connection per child at least');
    cmp_ok($r->{connections}, '<', 100, 'keep-alive used');

    my $f = $n->load(requests => 600, concurrency => 3, path => '/fixed');
    is($f->{ok}, 600, 'Content-Length responses parsed');
    my $h = $n->load(requests => 300, concurrency => 2, path => '/x', method => 'HEAD');
    is($h->{ok}, 300, 'HEAD responses parsed');
    my $nf = $n->load(requests => 200, concurrency => 2, path => '/nope');
    is($nf->{ok}, 0, 'no 200 for /nope');
    is($nf->{status}{404}, 200, 'other statuses counted separately');
}

# ---------------------------------------------------------------- reload during load
{
    my $before = count();
    my @old = $n->worker_pids;
    my ($done_at_hup, $done_after_reload, @new);
    my $r = $n->load(requests => 20000, concurrency => 8, path => '/x', during => sub {
        my ($ctl) = @_;
        $ctl->wait_done(2500, timeout => 30) or die "load made no progress";
        $done_at_hup = $ctl->done;
        $n->reload;
        $done_after_reload = $ctl->done;
        @new = $n->worker_pids;
        return 'reloaded';
    });
    is($r->{during_result}, 'reloaded', 'during callback ran');
    ok($done_at_hup < 20000 && $done_after_reload < 20000,
       "reload happened mid-load (HUP at $done_at_hup, reloaded at $done_after_reload)");
    is($r->{ok}, 20000, 'all 20000 answered 200 across the reload');
    is($r->{errors}, 0, 'no errors') or diag explain $r;
    is(count() - $before, $r->{ok}, 'nothing lost, nothing counted twice');
    note "retries after reload: $r->{retries}";
    is(scalar @new, 2, "two new workers: @new");
    my %old = map { $_ => 1 } @old;
    ok(!(grep { $old{$_} } @new), "new set (@new) disjoint from old (@old)");
    ok($n->wait_old_workers_gone(timeout => 10), 'old workers exit');
    is_deeply([ $n->worker_pids ], [ sort { $a <=> $b } @new ], 'worker_pids stable');
    is($n->get('/init')->{body}, "true\n", 'init_by_lua ran again in the new cycle');
}

# ---------------------------------------------------------------- failed reload is reported
{
    my %good = (http => 'lua_shared_dict c 1m;');
    my @before = $n->worker_pids;
    my $mark = $n->log_mark;
    $n->set_config(http => "lua_shared_dict c 1m;\n    this_is_not_a_directive on;");
    ok(!eval { $n->reload(timeout => 10); 1 }, 'reload with a bad config dies');
    like($@, qr/unknown directive "this_is_not_a_directive"/, 'with the [emerg] line');
    is_deeply([ $n->worker_pids ], \@before, 'old workers keep running');
    is($n->get('/x')->{status}, 200, 'and keep serving');
    ok(scalar(grep { /\[emerg\]/ } $n->error_lines(since => $mark)), 'error_lines(since) sees it');
    $n->set_config(%good);
    $n->reload;
    is($n->get('/x')->{status}, 200, 'good config back');
}

# ---------------------------------------------------------------- kill -9 a worker
{
    my $c = count();
    my @before = $n->worker_pids;
    my $victim = $before[0];
    my $mark = $n->log_mark;
    my @new = $n->kill_worker($victim, 'KILL');
    is(scalar @new, 1, "one replacement worker: @new");
    my @now = $n->worker_pids;
    is(scalar @now, 2, 'two workers again');
    ok(!(grep { $_ == $victim } @now), 'killed pid gone');
    ok(! -e "/proc/$victim" || do { open my $f, '<', "/proc/$victim/stat"; my $s = <$f>; $s =~ /\) [ZX] / },
       'killed pid no longer running');
    my @lines = $n->error_lines(since => $mark);
    ok((grep { /worker process $victim exited on signal 9/ } @lines), 'master logged the kill');
    my $r = $n->load(requests => 1000, concurrency => 4, path => '/x');
    is($r->{ok}, 1000, 'load after kill ok');
    is(count() - $c, 1000, 'counter intact after kill');
}

# ---------------------------------------------------------------- error log
{
    my @bad = $n->error_lines(ignore => qr/exited on signal 9|this_is_not_a_directive/);
    is(scalar @bad, 0, 'no unexpected [error]/[crit]/[alert]/[emerg] lines') or diag join "\n", @bad;
    like($n->error_log, qr/\[notice\].*start worker process/, 'error_log at info level readable');
}

# ---------------------------------------------------------------- stop
{
    my $master = $n->master_pid;
    my @kids = $n->child_pids;
    ok($n->stop, 'stopped gracefully with QUIT');
    ok(!$n->is_running, 'not running');
    ok(!kill(0, $master) || do { open my $f, '<', "/proc/$master/stat"; my $s = <$f> // ''; $s =~ /\) [ZX] / },
       'master gone');
    ok(!(grep { -e "/proc/$_/cmdline" && do { open my $f, '<', "/proc/$_/stat"; my $s = <$f> // ''; $s !~ /\) [ZX] / } } @kids),
       'children gone');
    ok(!IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $n->port, Proto => 'tcp', Timeout => 1),
       'port closed');
    my $prefix = $n->prefix;
    $n->cleanup;
    if ($ENV{SHMPROM_KEEP}) { ok(-d $prefix, "prefix kept: $prefix") }
    else                    { ok(!-d $prefix, 'prefix removed') }
}

# ---------------------------------------------------------------- start failure is reported
{
    my $bad = ShmpromTest->new(workers => 1, init => 'error("boom from init")');
    ok(!eval { $bad->start(timeout => 10); 1 }, 'start with failing init_by_lua dies');
    like($@, qr/boom from init/, 'with the error log line');
    ok(!$bad->is_running, 'nothing left running');
}

# ------------------------------------------------- a test ended by a signal
# A test process that starts an nginx and is then ended by TERM, or by
# SIGPIPE when its output is cut off (`prove ... | head`), stops that nginx
# on its way out.
for my $sig (qw(TERM PIPE)) {
    my $lib = File::Spec->catdir(ShmpromTest->repo, 't', 'lib');
    my $code = <<'EOP';
use ShmpromTest;
my $n = ShmpromTest->new(workers => 1);
$n->start;
$| = 1;
print "master ", $n->master_pid, " workers ", join(',', $n->worker_pids), " prefix ", $n->prefix, "\n";
# the parent reads this line, then sends TERM or closes its end of the pipe;
# bounded either way
for (1 .. 600) { print "waiting\n"; select(undef, undef, undef, 0.1) }
exit 0;
EOP
    my $pid = open(my $out, '-|', $^X, "-I$lib", '-e', $code) // die "fork: $!";
    my $line = <$out> // '';
    my ($master, $workers, $prefix) = $line =~ /^master (\d+) workers ([\d,]+) prefix (\S+)/;
    ok($master && kill(0, $master), "$sig: the child test started nginx (master $master)") or diag $line;
    my $status;
    if ($sig eq 'TERM') {
        kill 'TERM', $pid;
        ok(wait_until(sub { my $r = waitpid($pid, WNOHANG); $status = $? if $r == $pid; $r == $pid || $r < 0 },
                      timeout => 30), "$sig: the child test exited");
        close $out;
    } else {
        # its next print raises SIGPIPE; close waits for it to exit
        close $out;
        $status = $?;
        ok(!kill(0, $pid), "$sig: the child test exited");
    }
    my $signum = POSIX->can("SIG$sig")->();
    is(($status // 0) >> 8, 128 + $signum, "$sig: it exited with status 128 + $signum, through END");
    ok(wait_until(sub { !kill(0, $master) || do { open my $f, '<', "/proc/$master/stat"; my $s = <$f> // ''; $s =~ /\) [ZX] / } },
                  timeout => 10), "$sig: its nginx master $master is gone")
        or kill 'KILL', $master, split /,/, $workers;
    ok(!-d $prefix, "$sig: its prefix is removed");
}

diag sprintf('000-harness.t total %.1f s', time - $t_start);
done_testing;
