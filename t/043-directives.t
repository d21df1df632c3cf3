#!/usr/bin/perl
# ngx_http_shmprom_module's shmprom_inc and shmprom_observe: metrics defined
# with resty.shmprom in init_by_lua, recorded from nginx's log phase with no
# Lua, label values and values from nginx variables. A real nginx with 2
# workers: exact counts from concurrent clients on both workers, the same
# counter written by the directives and by log_by_lua, inheritance between
# levels, label values escaped, values parsed (bad ones refused and counted,
# never recorded), subrequests not recorded, a worker killed -9, reloads
# (counts kept; a configuration naming an unknown metric is rejected and the
# running one goes on recording), and each configuration mistake failing
# the start with the directive's file and line.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX ();
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
my $MOD = repo_root() . '/target/release/ngx_http_shmprom_module.so';
plan skip_all => "not built ($LIB, $MOD; run make build)" unless -f $LIB && -f $MOD;

my $init = <<'LUA';
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t043", size = "8m" }
        metrics:counter("t_requests_total", "Requests.", {"host", "status"})
        metrics:counter("t_worker_requests_total", "Requests by worker.", {"pid"})
        metrics:counter("t_bytes_total", "Bytes.", {"kind"})
        metrics:counter("t_plain_total", "No labels.")
        metrics:counter("t_label_total", "A label from a header.", {"v"})
        metrics:histogram("t_duration_seconds", "Request time.", {"host"}, {0.5, 10})
        metrics:histogram("t_size_bytes", "Sizes from the query.", {"kind"}, {10, 100, 1000})
        metrics:gauge("t_level", "A gauge.")
        metrics:counter("t_harness_total", "Requests to the harness's server.")
        m_req = metrics:counter("t_requests_total", "Requests.", {"host", "status"})
LUA

# load_module belongs to the main context (the harness's `main` part comes
# after its lua module's load_module)
my $main = "load_module $MOD;";

my $servers = <<'NGX';
    # http level: inherited by the server on $PORT3, which has none
    shmprom_inc t_plain_total;

    server {
        listen 127.0.0.1:$PORT2 reuseport;
        server_name t043;
        # subrequests run the log phase too: the module must skip them
        log_subrequest on;
        shmprom_inc t_requests_total host=$host status=$status;
        shmprom_inc t_worker_requests_total pid=$pid;
        shmprom_observe t_duration_seconds $request_time host=$host;

        location = /ok { return 200 "ok\n"; }
        location = /nf { return 404; }
        location = /teapot { return 418; }
        # a location with its own: only these two, not the server's
        location = /size {
            shmprom_observe t_size_bytes $arg_v kind=query;
            shmprom_inc t_bytes_total $arg_n kind=query;
            return 204;
        }
        location = /label {
            shmprom_inc t_label_total v=$http_x_label;
            return 204;
        }
        # the same counter and labels from log_by_lua as well
        location = /lua {
            return 200 "lua\n";
            log_by_lua_block { m_req:inc(1, ngx.var.host, ngx.status) }
        }
        # a subrequest: recorded once, as its main request
        location = /parent {
            content_by_lua_block {
                local r = ngx.location.capture("/ok")
                ngx.print(r.body)
            }
        }
    }

    server {
        listen 127.0.0.1:$PORT3;
        location / { return 200 "inherited\n"; }
    }
NGX

# A lua_shared_dict makes the lua module run init_by_lua later (once its
# zones are initialised): the module must find the metrics after that.
my $n = ShmpromTest->new(
    workers => 2,
    ports   => 3,
    main    => $main,
    http    => "    lua_shared_dict t043_dict 1m;\n",
    init    => $init,
    init_worker => '        metrics:init_worker()',
    # its own directive: the http level's is not inherited here
    server  => "        shmprom_inc t_harness_total;\n"
             . '        location = /metrics { content_by_lua_block { metrics:collect() } }',
    servers => $servers,
);
$n->start_ok('nginx with the module and a lua_shared_dict');

sub scrape {
    my $r = $n->get('/metrics');
    return undef unless $r->{status} == 200;
    return eval { parse_metrics($r->{body}) };
}

# nginx runs a request's log phase after its response reached the client:
# scrape until $cond holds for the output (at most 10 s) and return that
# output (the last one when it never held: the tests then say what it is)
sub scrape_when {
    my ($cond) = @_;
    my $p;
    wait_until(sub { $p = scrape(); $p && $cond->($p) }, timeout => 10);
    return $p;
}
sub v { my ($p, $name, %l) = @_; return metric_value($p, $name, %l) // 0 }

# $procs clients at once, each $each requests to $path on $PORT2, a new
# connection per request (reuseport spreads them over both workers)
sub load {
    my ($path, $procs, $each) = @_;
    my @kids;
    for (1 .. $procs) {
        my $pid = fork // die "fork: $!";
        if (!$pid) {
            my $bad = 0;
            for (1 .. $each) {
                my $r = $n->get([ $path, 2 ]);
                $bad++ unless $r->{status} =~ /^(?:200|204|404|418)$/;
            }
            POSIX::_exit($bad ? 1 : 0);
        }
        push @kids, $pid;
    }
    my $failed = 0;
    for (@kids) { waitpid($_, 0); $failed++ if $? }
    return $failed;
}

my $host = '127.0.0.1';
my %sent;

subtest 'counts from both workers, exact' => sub {
    is(load('/ok', 4, 150), 0, '600 GET /ok from 4 clients answered');
    is(load('/nf', 2, 50), 0, '100 GET /nf answered');
    is(load('/teapot', 2, 25), 0, '50 GET /teapot answered');
    my $p = scrape_when(sub { v($_[0], 't_duration_seconds_count', host => $host) >= 750 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 200), 600, '200: 600');
    is(metric_value($p, 't_requests_total', host => $host, status => 404), 100, '404: 100');
    is(metric_value($p, 't_requests_total', host => $host, status => 418), 50, '418: 50');
    my @w = metric_series($p, 't_worker_requests_total');
    is(scalar @w, 2, 'both workers recorded (label pid=$pid)') or diag explain \@w;
    is(metric_sum($p, 't_worker_requests_total'), 750, 'their counts add up to 750');
    is(metric_value($p, 't_duration_seconds_count', host => $host), 750, 'every request observed');
    is(metric_value($p, 't_duration_seconds_bucket', host => $host, le => '0.5'), 750,
       'request times (loopback, return) below 0.5 s');
    is(metric_value($p, 't_plain_total'), 0, 'the http-level directive is not the server\'s (it has its own)');
    is(metric_sum($p, 'shmprom_errors_total'), 0, 'no errors');
    is(metric_value($p, 'shmprom_planes', state => 'in_use'), 2, 'both workers hold a plane');
};

subtest 'inherited from the http level' => sub {
    for (1 .. 7) { is($n->get([ '/x', 3 ])->{status}, 200, "GET on the third server ($_)") }
    my $p = scrape_when(sub { v($_[0], 't_plain_total') >= 7 }) or return fail('scrape');
    is(metric_value($p, 't_plain_total'), 7, 't_plain_total 7');
};

subtest 'values from variables; bad ones refused, counted, not recorded' => sub {
    my $p0 = scrape() or return fail('scrape');
    my $bad0 = metric_value($p0, 'shmprom_errors_total', kind => 'bad_value') // 0;
    for my $v (5, 50, 500, 5000, 0, -3, 10, 100.5) {
        is($n->get([ "/size?v=$v&n=$v", 2 ])->{status}, 204, "size $v");
    }
    # not numbers, an infinite one, a negative increment: nothing recorded
    for my $q ('v=abc&n=abc', 'v=&n=', 'v=1e999&n=1e999', 'v=1x&n=-2', 'v=inf&n=nan') {
        is($n->get([ "/size?$q", 2 ])->{status}, 204, "refused values: $q");
    }
    my $p = scrape_when(sub {
        v($_[0], 'shmprom_errors_total', kind => 'bad_value') - $bad0 >= 11
            && v($_[0], 't_size_bytes_count', kind => 'query') >= 8
    }) or return fail('scrape');
    my %b = map { $_ => metric_value($p, 't_size_bytes_bucket', kind => 'query', le => $_) }
            qw(10 100 1000 +Inf);
    is_deeply(\%b, { 10 => 4, 100 => 5, 1000 => 7, '+Inf' => 8 },
              'buckets: 5 0 -3 10 | 50 | 500 100.5 | 5000 (v=1x refused)') or diag explain \%b;
    is(metric_value($p, 't_size_bytes_sum', kind => 'query'), 5 + 50 + 500 + 5000 + 0 - 3 + 10 + 100.5,
       'sum of the observations');
    is(metric_value($p, 't_size_bytes_count', kind => 'query'), 8, 'count 8');
    # n: the 8 accepted except -3 (a counter takes no negative increment)
    is(metric_value($p, 't_bytes_total', kind => 'query'), 5 + 50 + 500 + 5000 + 0 + 10 + 100.5,
       't_bytes_total adds the increments');
    my $bad = (metric_value($p, 'shmprom_errors_total', kind => 'bad_value') // 0) - $bad0;
    # refused: n=-3; v and n of abc, empty, 1e999; v=1x, n=-2; v=inf, n=nan
    is($bad, 11, 'shmprom_errors_total{kind="bad_value"} grew by 11');
};

subtest 'label values from a header, escaped in the output' => sub {
    my $v = 'he said "hi" \\ ok';
    is($n->get([ '/label', 2 ], 'X-Label' => $v)->{status}, 204, 'request with X-Label');
    is($n->get([ '/label', 2 ])->{status}, 204, 'request without: an empty value');
    scrape_when(sub { metric_sum($_[0], 't_label_total') >= 2 });
    my $r = $n->get('/metrics');
    like($r->{body}, qr/^t_label_total\{v="he said \\"hi\\" \\\\ ok"\} 1$/m, 'quote and backslash escaped');
    like($r->{body}, qr/^t_label_total\{v=""\} 1$/m, 'missing header: the empty value');
};

subtest 'one counter from the directives and from log_by_lua' => sub {
    my $p0 = scrape() or return fail('scrape');
    my $c0 = metric_value($p0, 't_requests_total', host => $host, status => 200);
    is(load('/lua', 2, 100), 0, '200 GET /lua answered');
    my $p = scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 200) - $c0 >= 400 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 200) - $c0, 400,
       '400 more: 200 from the directive, 200 from Lua, one series');
};

subtest 'subrequests are not recorded' => sub {
    my $p0 = scrape() or return fail('scrape');
    my $c0 = metric_value($p0, 't_requests_total', host => $host, status => 200);
    for (1 .. 5) { is($n->get([ '/parent', 2 ])->{body}, "ok\n", 'GET /parent (subrequest /ok)') }
    # a subrequest's log phase runs before its main request's
    my $p = scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 200) - $c0 >= 5 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 200) - $c0, 5, '5, not 10');
};

subtest 'a worker killed -9: nothing lost' => sub {
    my $p0 = scrape() or return fail('scrape');
    my $c0 = metric_value($p0, 't_requests_total', host => $host, status => 404);
    is(load('/nf', 2, 30), 0, '60 GET /nf answered');
    # recorded before the kill (a worker killed mid-request loses that one)
    scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 404) - $c0 >= 60 });
    my ($victim) = $n->worker_pids;
    $n->kill_worker($victim, 'KILL');
    is(load('/nf', 2, 30), 0, '60 more after the kill');
    my $p = scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 404) - $c0 >= 120 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 404) - $c0, 120,
       '120: the killed worker\'s counts stay (its plane is adopted)');
};

subtest 'reload: counts kept, directives found again' => sub {
    my $p0 = scrape() or return fail('scrape');
    my $c0 = metric_value($p0, 't_requests_total', host => $host, status => 418);
    ok(eval { $n->reload(wait_old => 1); 1 }, 'reload') or diag $@;
    is(load('/teapot', 2, 20), 0, '40 GET /teapot');
    my $p = scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 418) - $c0 >= 40 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 418) - $c0, 40, '40 more, on top');
    is(metric_sum($p, 'shmprom_errors_total', kind => 'internal'), 0, 'no internal errors');
};

subtest 'a reload naming an unknown metric is rejected; the running one records on' => sub {
    (my $bad = $servers) =~ s/shmprom_inc t_plain_total;/shmprom_inc t_nope_total;/ or die;
    $n->set_config(servers => $bad);
    my $err = eval { $n->reload; '' } // $@;
    like($err, qr/shmprom_inc "t_nope_total": no such metric .* in \S+nginx\.conf:\d+/,
         'rejected with the directive and its place');
    my $p0 = scrape() or return fail('scrape');
    my $c0 = metric_value($p0, 't_requests_total', host => $host, status => 200);
    is(load('/ok', 2, 10), 0, '20 GET /ok');
    my $p = scrape_when(sub { v($_[0], 't_requests_total', host => $host, status => 200) - $c0 >= 20 })
        or return fail('scrape');
    is(metric_value($p, 't_requests_total', host => $host, status => 200) - $c0, 20,
       'the running configuration still records');
    $n->set_config(servers => $servers);
};

subtest 'a reload redefining a metric: the directives record into the new one' => sub {
    (my $init2 = $init) =~ s/\{10, 100, 1000\}/{1, 1000}/ or die 'buckets not found';
    $n->set_config(init => $init2, servers => $servers);
    ok(eval { $n->reload(wait_old => 1); 1 }, 'reload with other buckets for t_size_bytes') or diag $@;
    is($n->get([ '/size?v=5&n=1', 2 ])->{status}, 204, 'observe 5');
    my $p = scrape_when(sub { v($_[0], 't_size_bytes_count', kind => 'query') == 1 })
        or return fail('scrape');
    is(v($p, 't_size_bytes_count', kind => 'query'), 1, 'the new family: count 1 (the old one left)');
    is(v($p, 't_size_bytes_bucket', kind => 'query', le => '1'), 0, 'new bound le="1": 0');
    is(v($p, 't_size_bytes_bucket', kind => 'query', le => '1000'), 1, 'new bound le="1000": 1');
    ok(!defined metric_value($p, 't_size_bytes_bucket', kind => 'query', le => '10'), 'old bound le="10" gone');
    is(metric_sum($p, 'shmprom_errors_total', kind => 'internal'), 0, 'no internal errors');
};

$n->stop;

# Each mistake fails the start, naming the directive, file and line.
my @mistakes = (
    [ 'unknown metric',   'shmprom_inc t_nope_total;', qr/shmprom_inc "t_nope_total": no such metric/ ],
    [ 'not a counter',    'shmprom_inc t_size_bytes kind=x;', qr/shmprom_inc "t_size_bytes": is not a counter/ ],
    [ 'not a histogram',  'shmprom_observe t_bytes_total 1 kind=x;', qr/shmprom_observe "t_bytes_total": is not a histogram/ ],
    [ 'a gauge',          'shmprom_inc t_level;', qr/shmprom_inc "t_level": is not a counter/ ],
    [ 'missing label',    'shmprom_inc t_requests_total host=$host;', qr/no value for its label status/ ],
    [ 'unknown label',    'shmprom_inc t_bytes_total kind=a other=b;', qr/has no label other/ ],
    [ 'label twice',      'shmprom_inc t_bytes_total kind=a kind=b;', qr/label "kind" given twice/ ],
    [ 'two values',       'shmprom_inc t_bytes_total 1 2 kind=a;', qr/"2" is a second value/ ],
    [ 'negative constant', 'shmprom_inc t_bytes_total -1 kind=a;', qr/"-1" is not a finite number >= 0/ ],
    [ 'observe no value', 'shmprom_observe t_size_bytes kind=a;', qr/needs a value to observe/ ],
);
for my $i (0 .. $#mistakes) {
    my ($what, $line, $re) = @{ $mistakes[$i] };
    # every other one with a lua_shared_dict (init_by_lua runs later)
    my $dict = $i % 2 ? "    lua_shared_dict t043_dict 1m;\n" : '';
    my $b = ShmpromTest->new(
        workers => 1,
        main    => $main,
        init    => $init,
        http    => "$dict    $line\n",
    );
    my $err = eval { $b->start; '' } // $@;
    like($err, qr/$re.*in \S+nginx\.conf:\d+/, "$what: the start fails, naming the directive");
    $b->stop if $b->is_running;
}

# no resty.shmprom zone at all: the metric cannot be found
{
    my $b = ShmpromTest->new(workers => 1, main => $main, http => "    shmprom_inc t_plain_total;\n");
    my $err = eval { $b->start; '' } // $@;
    like($err, qr/no such metric in the zones of resty\.shmprom's new\(\)/,
         'no zone attached: the start fails');
    $b->stop if $b->is_running;
}

done_testing;
