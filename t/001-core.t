# Core behaviour of shmprom through its Lua API (docs/contract.md) in a real
# nginx with 2 workers: exact counting under concurrent load, across a reload,
# redefinition of one family on reload, unlabelled metrics at 0, exposition
# format (Content-Type, independent parser, promtool), a killed worker.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempfile);
use IO::Socket::INET;
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
# SHMPROM_LUA_PATH (see t/lib/ShmpromTest.pm) runs these tests against a
# stand-in wrapper, to test the tests themselves before the library exists.
plan skip_all => "core library not built ($LIB missing; run make build)"
    unless -e $LIB || $ENV{SHMPROM_LUA_PATH};

my $t_start = time;
my $INF = 9**9**9;

# ---------------------------------------------------------------- config

# Two versions of the definitions: B changes the buckets of
# t_request_duration_seconds and adds a label to t_changed_total; every other
# family is defined identically.
sub init_code {
    my ($v) = @_;
    my $dur_buckets = $v eq 'A' ? '{0.005, 0.01, 0.1, 1}' : '{0.5, 2}';
    my $changed     = $v eq 'A' ? '{"a"}' : '{"a", "b"}';
    my $changed_lv  = $v eq 'A' ? '{"x"}' : '{"x", "y"}';
    return <<"LUA";
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t", size = "16m" }
        m_req      = metrics:counter("t_requests_total", "Requests by host and status.", {"host", "status"})
        m_dur      = metrics:histogram("t_request_duration_seconds", "Request duration.", nil, $dur_buckets)
        m_fixed    = metrics:histogram("t_fixed_seconds", "Always observes 0.25.", {"method"}, {0.1, 0.5, 1})
        m_inflight = metrics:gauge("t_in_flight", "Requests in flight.", nil, { mode = "livesum" })
        m_worker   = metrics:counter("t_worker_requests_total", "Requests by worker pid.", {"pid"})
        m_changed  = metrics:counter("t_changed_total", "Label set changes with the config version.", $changed)
        changed_lv = $changed_lv
        m_idle_c   = metrics:counter("t_idle_total", "Never incremented.")
        m_idle_g   = metrics:gauge("t_idle_level", "Never set.")
        m_idle_h   = metrics:histogram("t_idle_seconds", "Never observed.", nil, {0.1, 1})
        config_version = "$v"
LUA
}

my $log_code = <<'LUA';
            local function chk(what, ok, err)
                if not ok then ngx.log(ngx.ERR, "shmprom ", what, " failed: ", tostring(err)) end
            end
            chk("m_req:inc", m_req:inc(1, { ngx.var.host, ngx.var.status }))
            chk("m_dur:observe", m_dur:observe(tonumber(ngx.var.request_time)))
            chk("m_fixed:observe", m_fixed:observe(0.25, { ngx.req.get_method() }))
            chk("m_inflight:dec", m_inflight:dec(1))
            chk("m_worker:inc", m_worker:inc(1, { ngx.worker.pid() }))
            chk("m_changed:inc", m_changed:inc(1, changed_lv))
LUA

# /x answers at once; /xs after 1 ms, so that a load of 20,000 requests at
# concurrency 8 lasts 2.5 s at least and a reload started after 5,000 is
# over before it ends, however fast the machine (the same counting)
my $counted = sub {
    my ($path, $content) = @_;
    return <<"NGX";
        location = $path {
            access_by_lua_block {
                local ok, err = m_inflight:inc(1)
                if not ok then ngx.log(ngx.ERR, "shmprom m_inflight:inc failed: ", tostring(err)) end
            }
            content_by_lua_block { $content }
            log_by_lua_block {
$log_code
            }
        }
NGX
};

my $server = $counted->('/x', 'ngx.say("ok")') . $counted->('/xs', 'ngx.sleep(0.001) ngx.say("ok")') . <<"NGX";
        # held requests: report the worker pid, then wait until the client goes away
        location = /hold {
            lua_check_client_abort on;
            access_by_lua_block {
                local ok, err = m_inflight:inc(1)
                if not ok then ngx.log(ngx.ERR, "shmprom m_inflight:inc failed: ", tostring(err)) end
            }
            content_by_lua_block {
                ngx.on_abort(function() ngx.exit(499) end)
                ngx.say(ngx.worker.pid())
                ngx.flush(true)
                ngx.sleep(30)
            }
            log_by_lua_block {
                local ok, err = m_inflight:dec(1)
                if not ok then ngx.log(ngx.ERR, "shmprom m_inflight:dec failed: ", tostring(err)) end
            }
        }
        location = /metrics {
            content_by_lua_block { metrics:collect() }
        }
        location = /version {
            content_by_lua_block { ngx.say(config_version) }
        }
NGX

my $n = ShmpromTest->new(
    workers     => 2,
    listen      => 'reuseport',    # spread connections over both workers
    init        => init_code('A'),
    init_worker => '        metrics:init_worker()',
    server      => $server,
);

$n->start_ok('nginx starts with shmprom loaded');

# ---------------------------------------------------------------- helpers

my $last_body;
# scrape(%headers) -> (parsed or undef, response); a parse error is a failed test
sub scrape {
    my (%h) = @_;
    my $r = $n->get('/metrics', %h);
    $last_body = $r->{body};
    if ($r->{status} != 200) {
        fail("GET /metrics: $r->{status}");
        diag $r->{body};
        return (undef, $r);
    }
    my $p = eval { parse_metrics($r->{body}) };
    if (!$p) {
        fail("exposition parses: $@");
        diag $r->{body};
    }
    return ($p, $r);
}

sub cur { my ($p) = scrape(); return $p || { samples => {}, list => [], type => {}, help => {} } }

sub req_total   { metric_sum($_[0], 't_requests_total') }
sub dur_count   { metric_sum($_[0], 't_request_duration_seconds_count') }
sub dur_inf     { metric_value($_[0], 't_request_duration_seconds_bucket', le => '+Inf') // 0 }
sub inflight    { metric_value($_[0], 't_in_flight') }

# wait until the log phases of all answered requests have run (the response
# reaches the client before log_by_lua runs): t_requests_total == $want
sub settle {
    my ($want) = @_;
    my $last;
    wait_until(sub { my $p = cur(); $last = req_total($p); $last >= $want }, timeout => 10);
    return cur();
}

# histogram buckets of $name (with label filter) as [ [le_number, value], ... ] sorted by le
sub buckets {
    my ($p, $name, %f) = @_;
    my @b = map { [ $_->[0]{le} eq '+Inf' ? $INF : 0 + $_->[0]{le}, $_->[1] ] }
            metric_series($p, "${name}_bucket", %f);
    return sort { $a->[0] <=> $b->[0] } @b;
}

sub check_histogram {
    my ($p, $name, $count, $what, %f) = @_;
    my @b = buckets($p, $name, %f);
    ok(@b >= 1, "$what: buckets exported");
    my $mono = 1;
    for my $i (1 .. $#b) { $mono = 0 if $b[$i][1] < $b[$i - 1][1] }
    ok($mono, "$what: buckets cumulative (non-decreasing)");
    is($b[-1][0], $INF, "$what: last bucket is +Inf") if @b;
    my $c = metric_sum($p, "${name}_count", %f);
    is($c, $count, "$what: _count == $count");
    is(@b ? $b[-1][1] : undef, $c, "$what: +Inf bucket == _count");
}

# ---------------------------------------------------------------- before any traffic
subtest 'exposition before traffic' => sub {
    my ($p, $r) = scrape();
    return unless $p;
    is($r->{headers}{'content-type'}, 'text/plain; version=0.0.4; charset=utf-8', 'Content-Type 0.0.4');
    is($p->{type}{t_requests_total}, 'counter', 'TYPE counter');
    is($p->{type}{t_request_duration_seconds}, 'histogram', 'TYPE histogram');
    is($p->{type}{t_in_flight}, 'gauge', 'TYPE gauge (livesum)');
    is($p->{help}{t_requests_total}, 'Requests by host and status.', 'HELP');
    is(scalar(metric_series($p, 't_requests_total')), 0, 'labelled counter: no series before use');

    # unlabelled metrics are exported at 0 from their definition
    is(metric_value($p, 't_idle_total'), 0, 'unlabelled counter at 0');
    is(metric_value($p, 't_idle_level'), 0, 'unlabelled gauge at 0');
    is(metric_value($p, 't_in_flight'), 0, 'unlabelled livesum gauge at 0');
    is(metric_value($p, 't_idle_seconds_count'), 0, 'unlabelled histogram _count 0');
    is(metric_value($p, 't_idle_seconds_sum'), 0, 'unlabelled histogram _sum 0');
    is_deeply([ map { [ $_->[0], $_->[1] ] } buckets($p, 't_idle_seconds') ],
              [ [0.1, 0], [1, 0], [$INF, 0] ], 'unlabelled histogram: every bucket at 0');
    is(metric_value($p, 't_request_duration_seconds_count'), 0, 'unlabelled t_request_duration_seconds at 0');

    # self-metrics (contract: always present)
    for my $f (qw(shmprom_zone_bytes shmprom_series shmprom_series_capacity shmprom_series_dropped_total
                  shmprom_errors_total shmprom_planes shmprom_render_duration_seconds shmprom_render_bytes)) {
        ok($p->{type}{$f}, "self-metric family $f has a TYPE");
    }
    cmp_ok(metric_value($p, 'shmprom_zone_bytes', type => 'capacity') // 0, '>', 0, 'zone capacity > 0');
    cmp_ok(metric_value($p, 'shmprom_zone_bytes', type => 'used') // -1, '>', 0, 'zone used > 0');

    my ($om, $ro) = scrape(Accept => 'application/openmetrics-text; version=1.0.0');
    is($ro->{headers}{'content-type'}, 'application/openmetrics-text; version=1.0.0; charset=utf-8',
       'OpenMetrics Content-Type when asked for');
    like($ro->{body}, qr/\n# EOF\n\z/, 'OpenMetrics ends with # EOF');
    ok($om && $om->{eof}, 'OpenMetrics parses');
};

# ---------------------------------------------------------------- exact counting
my %seen_pids;
subtest '20000 requests, concurrency 8, 2 workers: counted exactly' => sub {
    my $r = $n->load(requests => 20000, concurrency => 8, path => '/x');
    diag sprintf('load: %d req in %.2f s = %.0f req/s (%d connections, %d retries)',
                 $r->{answered}, $r->{elapsed}, $r->{rate}, $r->{connections}, $r->{retries});
    is($r->{ok}, 20000, 'client got 20000 x 200');
    is($r->{errors}, 0, 'no client errors') or diag explain $r->{child_errors};
    my $p = settle($r->{ok});
    is(req_total($p), $r->{ok}, 'sum of t_requests_total == 200-responses received');
    is(metric_value($p, 't_requests_total', host => 'localhost', status => '200'), $r->{ok},
       't_requests_total{host="localhost",status="200"}');
    check_histogram($p, 't_request_duration_seconds', $r->{ok}, 'duration histogram');
    check_histogram($p, 't_fixed_seconds', $r->{ok}, 'labelled histogram', method => 'GET');
    is_deeply([ map { [ $_->[0], $_->[1] ] } buckets($p, 't_fixed_seconds', method => 'GET') ],
              [ [0.1, 0], [0.5, $r->{ok}], [1, $r->{ok}], [$INF, $r->{ok}] ], 'fixed histogram buckets exact');
    is(metric_value($p, 't_fixed_seconds_sum', method => 'GET'), 0.25 * $r->{ok}, 'fixed histogram _sum exact');
    is(metric_sum($p, 't_worker_requests_total'), $r->{ok}, 'per-worker counters sum to the total');
    my %by_pid = map { $_->[0]{pid} => $_->[1] } metric_series($p, 't_worker_requests_total');
    my %w = map { $_ => 1 } $n->worker_pids;
    ok(keys(%by_pid) >= 2, 'both workers counted: ' . join(', ', map { "$_=$by_pid{$_}" } sort keys %by_pid));
    ok(!(grep { !$w{$_} } keys %by_pid), 'pid labels are the workers');
    %seen_pids = %by_pid;
    is(metric_value($p, 't_changed_total', a => 'x'), $r->{ok}, 't_changed_total{a="x"}');
    ok(wait_until(sub { (inflight(cur()) // -1) == 0 }, timeout => 5), 'livesum in-flight gauge back to 0')
        or diag 't_in_flight = ' . (inflight(cur()) // 'absent');
    # stable: nothing counted late or twice
    my $p2 = cur();
    is(req_total($p2), $r->{ok}, 'still exact on a later scrape');
};

# ---------------------------------------------------------------- reload during load
subtest 'reload in the middle of 20000 requests: nothing lost, nothing twice' => sub {
    my $p0 = cur();
    my $before = req_total($p0);
    my $before_dur = dur_count($p0);
    my $before_fixed = metric_value($p0, 't_fixed_seconds_count', method => 'GET') // 0;
    my @old = $n->worker_pids;
    my ($at_hup, $after_reload, $mid1, $mid2, $scrape_ok);
    my $r = $n->load(requests => 20000, concurrency => 8, path => '/xs', during => sub {
        my ($ctl) = @_;
        $ctl->wait_done(5000, timeout => 60) or die "load made no progress\n";
        my ($pa) = scrape();
        $at_hup = $ctl->done;
        $n->reload;
        $after_reload = $ctl->done;
        my ($pb) = scrape();
        $scrape_ok = $pa && $pb;
        ($mid1, $mid2) = (req_total($pa || {list => []}), req_total($pb || {list => []}));
    });
    diag sprintf('HUP after %d responses, new workers up after %d; %d retries; %.0f req/s',
                 $at_hup, $after_reload, $r->{retries}, $r->{rate});
    ok($at_hup < 20000 && $after_reload < 20000, 'the reload happened while the load was running');
    ok($scrape_ok, 'scrapes during load and reload parse');
    cmp_ok($mid2, '>=', $mid1, "counter monotonic across the reload ($mid1 -> $mid2)");
    is($r->{ok}, 20000, 'client got 20000 x 200') or diag explain $r;
    is($r->{errors}, 0, 'no client errors');
    ok($n->wait_old_workers_gone(timeout => 15), 'old workers exited');
    my $p = settle($before + $r->{ok});
    is(req_total($p) - $before, $r->{ok}, 't_requests_total grew by exactly the 200-responses received');
    is(dur_count($p) - $before_dur, $r->{ok}, 'histogram _count grew by exactly that');
    is(dur_inf($p), dur_count($p), '+Inf bucket == _count');
    is((metric_value($p, 't_fixed_seconds_count', method => 'GET') // 0) - $before_fixed, $r->{ok},
       'labelled histogram _count grew by exactly that');
    is(metric_value($p, 't_fixed_seconds_sum', method => 'GET'), 0.25 * ($before_fixed + $r->{ok}),
       'labelled histogram _sum exact');
    my %by_pid = map { $_->[0]{pid} => $_->[1] } metric_series($p, 't_worker_requests_total');
    my @new_counted = grep { !$seen_pids{$_} } keys %by_pid;
    ok(@new_counted >= 1, 'new workers counted: ' . join(', ', map { "$_=$by_pid{$_}" } @new_counted));
    for my $pid (keys %seen_pids) {
        cmp_ok($by_pid{$pid} // 0, '>=', $seen_pids{$pid}, "old worker $pid keeps its count");
    }
    is(metric_sum($p, 't_worker_requests_total'), req_total($p), 'per-worker counters sum to the total');
    ok(wait_until(sub { (inflight(cur()) // -1) == 0 }, timeout => 5), 'livesum in-flight gauge back to 0')
        or diag 't_in_flight = ' . (inflight(cur()) // 'absent');
    is(req_total(cur()), req_total($p), 'still exact on a later scrape');
};

# ---------------------------------------------------------------- changed definition on reload
subtest 'reload with a changed definition resets only that family' => sub {
    my $p0 = cur();
    my $req0 = req_total($p0);
    my $fixed0 = metric_value($p0, 't_fixed_seconds_count', method => 'GET');
    my $worker0 = metric_sum($p0, 't_worker_requests_total');
    my $changed0 = metric_value($p0, 't_changed_total', a => 'x');
    ok($changed0 && dur_count($p0), 'families to be changed have values before');

    $n->set_config(init => init_code('B'));
    $n->reload(wait_old => 1);
    is($n->get('/version')->{body}, "B\n", 'new definitions loaded');

    my $p = cur();
    is(req_total($p), $req0, 'unchanged counter keeps its value');
    is(metric_value($p, 't_fixed_seconds_count', method => 'GET'), $fixed0, 'unchanged histogram keeps its value');
    is(metric_sum($p, 't_worker_requests_total'), $worker0, 'unchanged labelled counter keeps its value');
    is(metric_value($p, 't_changed_total', a => 'x'), undef, 'old series of the relabelled family dropped');
    is(scalar(metric_series($p, 't_changed_total')), 0, 'relabelled family has no series yet');
    is($p->{type}{t_changed_total}, 'counter', 'relabelled family still declared');
    is(metric_sum($p, 't_request_duration_seconds_count'), 0, 'rebucketed histogram starts at 0');
    is_deeply([ map { $_->[0] } buckets($p, 't_request_duration_seconds') ], [0.5, 2, $INF],
              'rebucketed histogram has the new buckets only');

    my $r = $n->load(requests => 2000, concurrency => 4, path => '/x');
    is($r->{ok}, 2000, '2000 more requests');
    $p = settle($req0 + $r->{ok});
    is(req_total($p), $req0 + $r->{ok}, 'unchanged counter continues');
    is(metric_value($p, 't_changed_total', a => 'x', b => 'y'), $r->{ok}, 'relabelled family counts afresh');
    is(scalar(metric_series($p, 't_changed_total')), 1, 'and only with the new label set');
    check_histogram($p, 't_request_duration_seconds', $r->{ok}, 'rebucketed histogram');
    is_deeply([ map { $_->[0] } buckets($p, 't_request_duration_seconds') ], [0.5, 2, $INF], 'new buckets');
};

# ---------------------------------------------------------------- held requests
# hold_requests(): /hold requests (each answers its worker pid, then waits
# until the client goes away) until every worker holds at least 2 of them.
# Returns ([ [socket, pid], ... ], { pid => count }).
sub hold_requests { return $n->hold('/hold') }

sub planes_in_use { metric_value($_[0], 'shmprom_planes', state => 'in_use') // -1 }
sub gauge_is {
    my ($want, $what, $timeout) = @_;
    my $last;
    my $ok = wait_until(sub { $last = inflight(cur()) // 'absent'; $last eq $want }, timeout => $timeout // 5);
    ok($ok, "$what: t_in_flight == $want") or diag "t_in_flight = $last; shmprom_planes in_use = "
        . planes_in_use(cur()) . '; workers ' . join(' ', $n->worker_pids);
}

# ---------------------------------------------------------------- live gauge across reloads
# Requests held over a reload-fresh worker's first second, released, then the
# workers retire (reload): the in-flight gauge must come back to exactly 0.
subtest 'livesum gauge: shares of retired workers do not leave residue' => sub {
    $n->reload(wait_old => 1);
    my $p = cur();
    note 'right after reload: shmprom_planes in_use = ' . planes_in_use($p) . ' of ' . scalar($n->worker_pids) . ' workers';
    my ($socks, $held) = hold_requests();
    ok(keys(%$held) >= 2, 'held requests on both workers: ' . join(', ', map { "$_=$held->{$_}" } sort keys %$held))
        or return;
    gauge_is(scalar @$socks, 'all held requests in flight');
    ok(wait_until(sub { planes_in_use(cur()) == $n->workers }, timeout => 5),
       'every worker holds a plane (shmprom_planes in_use == workers)')
        or diag 'shmprom_planes in_use = ' . planes_in_use(cur());
    close $_->[0] for @$socks;
    gauge_is(0, 'released');
    $n->reload(wait_old => 1);
    gauge_is(0, 'after the workers that ran them retired');
    $n->reload(wait_old => 1);
    gauge_is(0, 'and after one more reload');
};

# ---------------------------------------------------------------- killed worker
subtest 'kill -9 of the workers: counts stay, their live gauge shares are dropped' => sub {
    # start from fresh workers (a reload) so that this covers their first second too
    $n->reload(wait_old => 1);
    my $base = inflight(cur()) // 0;    # residue from the subtest above, if any
    my $req0 = req_total(cur());
    my ($socks, $held) = hold_requests();
    ok(keys(%$held) >= 2, 'held requests on both workers: ' . join(', ', map { "$_=$held->{$_}" } sort keys %$held))
        or return;
    my $left = @$socks;
    gauge_is($base + $left, "$left held requests in flight");
    my $mark = $n->log_mark;
    for my $victim (sort { $held->{$b} <=> $held->{$a} } keys %$held) {
        my @repl = $n->kill_worker($victim, 'KILL');
        ok(@repl == 1, "worker $victim (holding $held->{$victim}) replaced by @repl");
        $left -= $held->{$victim};
        gauge_is($base + $left, "killed worker $victim\'s share dropped");
    }
    is(req_total(cur()), $req0, 'counter values of the killed workers stay');
    close $_->[0] for @$socks;

    my $r = $n->load(requests => 4000, concurrency => 4, path => '/x');
    is($r->{ok}, 4000, 'load after the kills');
    my $p = settle($req0 + $r->{ok});
    is(req_total($p), $req0 + $r->{ok}, 'counting stays exact after the kills');
    is(metric_sum($p, 't_worker_requests_total'), req_total($p), 'per-worker counters sum to the total');
    gauge_is($base, 'in-flight back to where it was');
    my @unexpected = $n->error_lines(since => $mark, ignore => qr/exited on signal 9/);
    is(scalar @unexpected, 0, 'no unexpected error log lines around the kills') or diag join "\n", @unexpected;
};

# ---------------------------------------------------------------- reload overlap
# The zone has one plane per worker (the default). Old workers kept alive by
# held requests hold the planes; the new workers write counters on the shared
# plane and their in-flight shares through spares; a new worker killed -9 in
# that window takes its share with it; once the old workers are gone the new
# ones take the planes, their shares with them.
sub spares_in_use { metric_value($_[0], 'shmprom_plane_spares', state => 'in_use') // -1 }
subtest 'reload overlap: new workers without a plane keep livesum shares on spares' => sub {
    $n->reload(wait_old => 1);
    my $base = inflight(cur()) // 0;
    my $req0 = req_total(cur());
    is(metric_value(cur(), 'shmprom_planes', state => 'total'), $n->workers, 'one plane per worker by default');
    is(metric_value(cur(), 'shmprom_plane_spares', state => 'total'), $n->workers, 'and as many spares');
    my ($old_socks, $old_held) = hold_requests();
    ok(keys(%$old_held) >= 2, 'old workers hold requests: ' . join(', ', map { "$_=$old_held->{$_}" } sort keys %$old_held))
        or return;
    my $old_n = @$old_socks;
    $n->reload;    # the old workers stay, finishing their held requests
    my @old = $n->old_worker_pids;
    is(scalar @old, $n->workers, 'old workers still running: ' . join(' ', @old));
    my $r = $n->load(requests => 2000, concurrency => 4, path => '/x');
    is($r->{ok}, 2000, '2000 requests through the new workers');
    ok(wait_until(sub { spares_in_use(cur()) == $n->workers }, timeout => 5),
       'each new worker holds a spare') or diag 'spares in use: ' . spares_in_use(cur());
    is(planes_in_use(cur()), $n->workers, 'the old workers still hold the planes');
    my ($socks, $held) = hold_requests();
    ok(keys(%$held) >= 2, 'new workers hold requests: ' . join(', ', map { "$_=$held->{$_}" } sort keys %$held))
        or return;
    my $left = $old_n + @$socks;
    gauge_is($base + $left, "$old_n old + " . scalar(@$socks) . ' new held requests in flight');
    my ($victim) = sort { $held->{$b} <=> $held->{$a} } keys %$held;
    my @repl = $n->kill_worker($victim, 'KILL');
    ok(@repl == 1, "new worker $victim (holding $held->{$victim}) killed -9, replaced by @repl");
    $left -= $held->{$victim};
    gauge_is($base + $left, "the killed worker's share (on its spare) dropped");
    ok(wait_until(sub { spares_in_use(cur()) == $n->workers }, timeout => 5),
       'its replacement took a spare') or diag 'spares in use: ' . spares_in_use(cur());
    close $_->[0] for @$old_socks;
    ok($n->wait_old_workers_gone(timeout => 10), 'old workers gone once their requests ended');
    $left -= $old_n;
    gauge_is($base + $left, 'old workers\' shares out');
    ok(wait_until(sub { my $p = cur(); planes_in_use($p) == $n->workers && spares_in_use($p) == 0 }, timeout => 5),
       'the new workers took the planes and gave the spares back')
        or diag 'planes in use ' . planes_in_use(cur()) . ', spares in use ' . spares_in_use(cur());
    gauge_is($base + $left, 'the survivors\' shares moved with them to their planes');
    close $_->[0] for @$socks;
    gauge_is($base, 'all released: in flight back to where it was');
    my $r2 = $n->load(requests => 2000, concurrency => 4, path => '/x');
    my $p = settle($req0 + $r->{ok} + $r2->{ok});
    is(req_total($p), $req0 + $r->{ok} + $r2->{ok}, 'every request counted, through the shared plane and the planes');
};

# ---------------------------------------------------------------- promtool
subtest 'promtool check metrics' => sub {
    my ($dir) = grep { length && -x "$_/promtool" } split /:/, $ENV{PATH} // '';
    plan skip_all => 'promtool not on PATH' unless $dir;
    my ($p, $r) = scrape();
    my ($fh, $file) = tempfile('shmprom-metrics-XXXXXX', TMPDIR => 1, UNLINK => 1);
    print {$fh} $r->{body};
    close $fh;
    my $out = `'$dir/promtool' check metrics < '$file' 2>&1`;
    is($?, 0, 'promtool check metrics passes') or diag "$out\n--- body:\n$r->{body}";
};

# ---------------------------------------------------------------- error log, stop
{
    my @bad = $n->error_lines(ignore => qr/exited on signal 9/);
    is(scalar @bad, 0, 'no [error]/[crit]/[alert]/[emerg] lines in the error log') or diag join "\n", @bad;
    ok($n->stop, 'nginx stops gracefully');
}

diag sprintf('001-core.t total %.1f s', time - $t_start);
done_testing;
