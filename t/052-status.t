#!/usr/bin/perl
# The status page module (lua/resty/shmprom/status.lua) inside a real nginx,
# fed by a stand-in metrics object whose metric_data() returns a fixed
# exposition: checks the JSON numbers (totals, ratios, quantiles from the
# buckets, per-node health, zone usage), the ways serve() finds the metrics,
# error handling, and that the HTML page is self-contained.
# Needs nginx with the lua module (Debian: libnginx-mod-http-lua); does not
# need libshmprom.so.
use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use File::Spec;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use lib File::Spec->catdir(dirname(__FILE__), 'lib');
use ShmpromTest qw(wait_until);

my $ROOT = File::Spec->rel2abs(File::Spec->catdir(dirname(__FILE__), File::Spec->updir));
my $NGINX = $ENV{NGINX} // '/usr/sbin/nginx';
my $LUA_MOD = '/usr/lib/nginx/modules/ngx_http_lua_module.so';
my $NDK_MOD = '/usr/lib/nginx/modules/ndk_http_module.so';

plan skip_all => "nginx not found at $NGINX" unless -x $NGINX;
plan skip_all => "lua module not found at $LUA_MOD" unless -f $LUA_MOD && -f $NDK_MOD;

# ---- small local helpers ---------------------------------------------------

sub free_port {
    my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1',
                                  LocalPort => 0, Proto => 'tcp', ReuseAddr => 1)
        or die "no free port: $!";
    my $port = $s->sockport;
    close $s;
    return $port;
}

sub slurp { open my $f, '<', $_[0] or return ''; local $/; return scalar <$f> }

# ---- the fixture -------------------------------------------------------------

my $fixture = <<'PROM';
# HELP dfs_gateway_requests_total Requests by file-system operation and status.
# TYPE dfs_gateway_requests_total counter
dfs_gateway_requests_total{op="read",status="200"} 90
dfs_gateway_requests_total{op="read",status="502"} 10
dfs_gateway_requests_total{op="write",status="201"} 40
dfs_gateway_requests_total{op="list",status="207"} 5
# TYPE dfs_gateway_request_duration_seconds histogram
dfs_gateway_request_duration_seconds_bucket{op="read",le="0.001"} 0
dfs_gateway_request_duration_seconds_bucket{op="read",le="0.01"} 50
dfs_gateway_request_duration_seconds_bucket{op="read",le="0.1"} 90
dfs_gateway_request_duration_seconds_bucket{op="read",le="1"} 100
dfs_gateway_request_duration_seconds_bucket{op="read",le="+Inf"} 100
dfs_gateway_request_duration_seconds_sum{op="read"} 12.5
dfs_gateway_request_duration_seconds_count{op="read"} 100
dfs_gateway_request_duration_seconds_bucket{op="write",le="0.001"} 0
dfs_gateway_request_duration_seconds_bucket{op="write",le="0.01"} 0
dfs_gateway_request_duration_seconds_bucket{op="write",le="0.1"} 20
dfs_gateway_request_duration_seconds_bucket{op="write",le="1"} 40
dfs_gateway_request_duration_seconds_bucket{op="write",le="+Inf"} 40
dfs_gateway_request_duration_seconds_sum{op="write"} 9.25
dfs_gateway_request_duration_seconds_count{op="write"} 40
# TYPE dfs_gateway_received_bytes_total counter
dfs_gateway_received_bytes_total{op="read"} 5000
dfs_gateway_received_bytes_total{op="write"} 400000
# TYPE dfs_gateway_sent_bytes_total counter
dfs_gateway_sent_bytes_total{op="read"} 1e6
dfs_gateway_sent_bytes_total{op="write"} 8000
# TYPE dfs_gateway_requests_in_flight gauge
dfs_gateway_requests_in_flight 3
# TYPE dfs_gateway_connections gauge
dfs_gateway_connections{state="active"} 4
dfs_gateway_connections{state="reading"} 0
dfs_gateway_connections{state="writing"} 1
dfs_gateway_connections{state="waiting"} 3
# TYPE dfs_gateway_upstream_attempts_total counter
dfs_gateway_upstream_attempts_total{node="127.0.0.1:8081",status="200"} 60
dfs_gateway_upstream_attempts_total{node="127.0.0.1:8081",status="502"} 10
dfs_gateway_upstream_attempts_total{node="127.0.0.1:8082",status="200"} 70
dfs_gateway_upstream_attempts_total{node="we\"ird\\no\nde",status="-"} 1
# TYPE dfs_gateway_upstream_failures_total counter
dfs_gateway_upstream_failures_total{node="127.0.0.1:8081"} 10
dfs_gateway_upstream_failures_total{node="we\"ird\\no\nde"} 1
# TYPE dfs_gateway_upstream_retries_total counter
dfs_gateway_upstream_retries_total{node="127.0.0.1:8081"} 9
# TYPE dfs_gateway_upstream_duration_seconds histogram
dfs_gateway_upstream_duration_seconds_bucket{node="127.0.0.1:8082",le="0.01"} 35
dfs_gateway_upstream_duration_seconds_bucket{node="127.0.0.1:8082",le="0.1"} 70
dfs_gateway_upstream_duration_seconds_bucket{node="127.0.0.1:8082",le="+Inf"} 70
dfs_gateway_upstream_duration_seconds_sum{node="127.0.0.1:8082"} 1.5
dfs_gateway_upstream_duration_seconds_count{node="127.0.0.1:8082"} 70
# TYPE dfs_gateway_node_up gauge
dfs_gateway_node_up{node="127.0.0.1:8081"} 0
dfs_gateway_node_up{node="127.0.0.1:8082"} 1
# TYPE dfs_gateway_node_probe_duration_seconds gauge
dfs_gateway_node_probe_duration_seconds{node="127.0.0.1:8081"} 0.5
dfs_gateway_node_probe_duration_seconds{node="127.0.0.1:8082"} 0.002
# TYPE shmprom_zone_bytes gauge
shmprom_zone_bytes{type="used"} 1000
shmprom_zone_bytes{type="capacity"} 4000
# TYPE shmprom_zone_fill_ratio gauge
shmprom_zone_fill_ratio{region="slots"} 0.25
shmprom_zone_fill_ratio{region="keys"} 0.125
shmprom_zone_fill_ratio{region="cells"} 0.5
# TYPE shmprom_series gauge
shmprom_series{family="a"} 30
shmprom_series{family="b"} 20
# TYPE shmprom_series_capacity gauge
shmprom_series_capacity 200
# TYPE shmprom_series_dropped_total counter
shmprom_series_dropped_total{family="a"} 2
shmprom_series_dropped_total{family="b"} 1
# TYPE shmprom_errors_total counter
shmprom_errors_total{kind="bad_value"} 4
# TYPE shmprom_planes gauge
shmprom_planes{state="in_use"} 2
shmprom_planes{state="total"} 64
# TYPE shmprom_plane_spares gauge
shmprom_plane_spares{state="in_use"} 1
shmprom_plane_spares{state="total"} 63
# TYPE shmprom_render_duration_seconds gauge
shmprom_render_duration_seconds NaN
# TYPE shmprom_render_bytes gauge
shmprom_render_bytes 1234 1700000000000
PROM

# ---- nginx ------------------------------------------------------------------

my $dir = tempdir('shmprom-status-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
mkdir "$dir/tmp";
chmod 0777, "$dir/tmp";
{ open my $f, '>', "$dir/fixture.prom" or die $!; print $f $fixture; close $f }
my $port = free_port();
my $user = $> == 0 ? 'user root root;' : '';

my $conf = <<"CONF";
load_module $NDK_MOD;
load_module $LUA_MOD;
$user
worker_processes 2;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    lua_package_path "$ROOT/lua/?.lua;/usr/share/lua/5.1/?.lua;;";
    init_by_lua_block {
        local f = assert(io.open("$dir/fixture.prom"))
        local text = f:read("*a")
        f:close()
        package.loaded["test.fake"] = {
            metrics = { metric_data = function(self) return text end },
            text = function() return text end,
        }
    }
    server {
        listen 127.0.0.1:$port;
        location = /status {
            content_by_lua_block {
                require("resty.shmprom.status").serve(require("test.fake").metrics)
            }
        }
        location = /status.json {
            content_by_lua_block {
                require("resty.shmprom.status").serve(require("test.fake").metrics)
            }
        }
        location = /gateway/status {
            content_by_lua_block {
                local fake = require("test.fake")
                require("resty.shmprom.status").serve({ metrics = fake.metrics })
            }
        }
        location = /function/status {
            content_by_lua_block {
                require("resty.shmprom.status").serve(require("test.fake").text)
            }
        }
        location = /failing/status {
            content_by_lua_block {
                require("resty.shmprom.status").serve({
                    metric_data = function() return nil, "zone unavailable" end })
            }
        }
        location = /bad/status {
            content_by_lua_block {
                require("resty.shmprom.status").serve({})
            }
        }
    }
}
CONF
{ open my $f, '>', "$dir/nginx.conf" or die $!; print $f $conf; close $f }

my $pid = fork // die "fork: $!";
if (!$pid) {
    open STDOUT, '>', "$dir/stdout.log";
    open STDERR, '>', "$dir/stderr.log";
    exec $NGINX, '-p', $dir, '-c', "$dir/nginx.conf" or POSIX::_exit(127);
}

sub stop_nginx {
    return unless $pid;
    kill 'QUIT', $pid;
    my $gone = wait_until(sub { waitpid($pid, WNOHANG) == $pid }, timeout => 10);
    if (!$gone) { kill 'KILL', $pid; waitpid($pid, 0) }
    undef $pid;
}
END { stop_nginx() }

my $http = HTTP::Tiny->new(timeout => 5);
my $base = "http://127.0.0.1:$port";
my $up = wait_until(sub {
    return 0 if waitpid($pid, WNOHANG) == $pid && ($pid = 0, 1);
    my $r = $http->get("$base/status.json");
    return $r->{status} == 200;
}, timeout => 15);
if (!$up) {
    diag "nginx did not come up:\n" . slurp("$dir/stderr.log") . slurp("$dir/error.log");
    fail('nginx with the lua module starts');
    stop_nginx();
    done_testing();
    exit 1;
}

# ---- JSON ---------------------------------------------------------------------

my $json = JSON::PP->new;
sub get_json {
    my ($path) = @_;
    my $r = $http->get("$base$path");
    is $r->{status}, 200, "GET $path: 200" or diag $r->{content};
    like $r->{headers}{'content-type'}, qr{^application/json}, "GET $path: JSON content type";
    is $r->{headers}{'cache-control'}, 'no-store', "GET $path: not cached";
    my $d = eval { $json->decode($r->{content}) };
    ok $d, "GET $path: valid JSON" or diag $@, $r->{content};
    return $d // {};
}

sub near {
    my ($got, $exp, $name) = @_;
    my $ok = defined $got && !ref $got && abs($got - $exp) <= 1e-9 * (1 + abs $exp);
    ok $ok, $name or diag "got " . ($got // 'null') . ", expected $exp";
}

my $t0 = time;
my $s = get_json('/status?format=json');
is $s->{version}, 1, 'schema version';
ok $s->{time} > $t0 - 5 && $s->{time} < time + 5, 'server time in seconds';
like $s->{pid}, qr/^\d+$/, 'worker pid';

# totals
is $s->{totals}{requests}, 145, 'total requests';
is $s->{totals}{errors}, 10, 'total 5xx';
near $s->{totals}{error_ratio}, 10 / 145, 'total error ratio';
is $s->{totals}{received_bytes}, 405000, 'bytes received';
is $s->{totals}{sent_bytes}, 1008000, 'bytes sent';
is $s->{totals}{in_flight}, 3, 'in flight';

# ops
is_deeply [sort keys %{ $s->{ops} }], [qw(list read write)], 'ops seen';
my $read = $s->{ops}{read};
is $read->{requests}, 100, 'read requests';
is $read->{errors}, 10, 'read 5xx';
near $read->{error_ratio}, 0.1, 'read error ratio';
is_deeply $read->{by_status}, { 200 => 90, 502 => 10 }, 'read by status';
is $read->{received_bytes}, 5000, 'read bytes in';
is $read->{sent_bytes}, 1000000, 'read bytes out (1e6 parsed)';
is $read->{duration}{count}, 100, 'read duration count';
near $read->{duration}{sum}, 12.5, 'read duration sum';
near $read->{duration}{p50}, 0.01, 'read p50 = 0.001 + 0.009 * 50/50';
near $read->{duration}{p99}, 0.91, 'read p99 = 0.1 + 0.9 * 9/10';
is_deeply $read->{duration}{buckets},
    [ map { { le => $_->[0], count => $_->[1] } }
      ['0.001', 0], ['0.01', 50], ['0.1', 90], ['1', 100], ['+Inf', 100] ],
    'read buckets sorted by bound, +Inf last';
my $write = $s->{ops}{write};
is $write->{errors}, 0, 'write 5xx';
is $write->{error_ratio}, 0, 'write error ratio 0';
near $write->{duration}{p50}, 0.1, 'write p50';
near $write->{duration}{p99}, 0.1 + 0.9 * 19.6 / 20, 'write p99';
my $list = $s->{ops}{list};
is $list->{requests}, 5, 'list requests';
ok !defined $list->{duration}{p50} && !defined $list->{duration}{p99},
    'no histogram: quantiles null';
is_deeply $list->{duration}{buckets}, [], 'no histogram: no buckets';

# nodes
my $weird = "we\"ird\\no\nde";
is_deeply [sort keys %{ $s->{nodes} }], [sort '127.0.0.1:8081', '127.0.0.1:8082', $weird],
    'nodes seen, escaped label value decoded';
my $n1 = $s->{nodes}{'127.0.0.1:8081'};
is $n1->{up}, 0, '8081 down';
is $n1->{attempts}, 70, '8081 attempts';
is $n1->{failures}, 10, '8081 failures';
is $n1->{retries}, 9, '8081 retries';
near $n1->{failure_ratio}, 1 / 7, '8081 failure ratio';
near $n1->{probe_seconds}, 0.5, '8081 probe time';
is_deeply $n1->{by_status}, { 200 => 60, 502 => 10 }, '8081 by status';
my $n2 = $s->{nodes}{'127.0.0.1:8082'};
is $n2->{up}, 1, '8082 up';
is $n2->{failures}, 0, '8082 no failures';
is $n2->{failure_ratio}, 0, '8082 failure ratio 0';
near $n2->{duration}{p50}, 0.01, '8082 upstream p50';
near $n2->{duration}{p99}, 0.01 + 0.09 * 34.3 / 35, '8082 upstream p99';
ok !defined $s->{nodes}{$weird}{up}, 'node never probed: up null';
is $s->{nodes_up}, 1, 'nodes up';
is $s->{nodes_total}, 3, 'nodes total';
is_deeply $s->{connections}, { active => 4, reading => 0, writing => 1, waiting => 3 },
    'connections';

# zone
my $z = $s->{zone};
is $z->{bytes_used}, 1000, 'zone bytes used';
is $z->{bytes_capacity}, 4000, 'zone bytes capacity';
near $z->{bytes_ratio}, 0.25, 'zone bytes ratio';
is $z->{series}, 50, 'series';
is $z->{series_capacity}, 200, 'series capacity';
near $z->{series_ratio}, 0.25, 'series ratio';
is_deeply $z->{series_by_family}, { a => 30, b => 20 }, 'series by family';
is_deeply $z->{fill}, { slots => 0.25, keys => 0.125, cells => 0.5 }, 'fill ratio per region';
is $z->{fill_ratio}, 0.5, 'the fullest region\'s fill ratio';
is $z->{fill_region}, 'cells', 'the fullest region';
is $z->{dropped}, 3, 'dropped summed';
is $z->{errors}, 4, 'errors summed';
is $z->{planes_in_use}, 2, 'planes in use';
is $z->{planes_total}, 64, 'planes total';
is $z->{spares_in_use}, 1, 'spares in use (workers without a plane)';
is $z->{spares_total}, 63, 'spares total';

# the other ways to ask and to pass the metrics
sub strip { my %c = %{ $_[0] }; delete @c{qw(time pid)}; \%c }
is_deeply strip(get_json('/status.json')), strip($s), '/status.json gives the same JSON';
is_deeply strip(get_json('/gateway/status?format=json')), strip($s),
    'a gateway object holding the metrics object works';
is_deeply strip(get_json('/function/status?format=json')), strip($s),
    'a function returning the text works';

{
    my $r = $http->get("$base/failing/status?format=json");
    is $r->{status}, 500, 'metric_data() failing: 500';
    my $d = eval { $json->decode($r->{content}) } // {};
    like $d->{error}, qr/zone unavailable/, 'metric_data() failing: error in JSON';
    $r = $http->get("$base/bad/status");
    is $r->{status}, 500, 'serve() without a metrics object raises (500)';
    like slurp("$dir/error.log"), qr/expected a shmprom metrics object/,
        'the raised error names the problem';
    $r = $http->request('POST', "$base/status", { content => 'x' });
    is $r->{status}, 405, 'POST: 405';
}

# ---- HTML ----------------------------------------------------------------------

my $r = $http->get("$base/status");
is $r->{status}, 200, 'GET /status: 200';
like $r->{headers}{'content-type'}, qr{^text/html}, 'HTML content type';
my $html = $r->{content};
like $html, qr/^<!doctype html>/i, 'an HTML document';
like $html, qr/<style>.+<\/style>/s, 'inline CSS';
like $html, qr/<script>.+<\/script>/s, 'inline JS';
unlike $html, qr/<script[^>]+src\s*=/i, 'no external script';
unlike $html, qr/<link\b/i, 'no linked stylesheet or icon';
unlike $html, qr/<img\b|url\(|\@import/i, 'no images, CSS urls or imports';
unlike $html, qr{(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}}i, 'no absolute URL at all';
like $html, qr/format=json/, 'the page polls the JSON';
like $html, qr/\b2000\b/, 'every 2 s';
for my $id (qw(c-ops c-err c-nodes c-zone ops nodes bar-bytes bar-series)) {
    like $html, qr/id="\Q$id\E"/, "element #$id";
}
is $http->get("$base/status?format=html")->{content}, $html, 'other formats: the page';

SKIP: {
    my ($js) = $html =~ /<script>(.*)<\/script>/s;
    my $node = (grep { -x "$_/node" } split /:/, $ENV{PATH} // '')[0];
    skip 'node not installed: JS syntax not checked', 1 unless $node && $js;
    open my $f, '>', "$dir/page.js" or die $!;
    print $f $js;
    close $f;
    my $out = `"$node/node" --check "$dir/page.js" 2>&1`;
    is $?, 0, 'the page script parses (node --check)' or diag $out;
}

stop_nginx();
unlike slurp("$dir/error.log"), qr/\[(?:alert|emerg|crit)\]/, 'no alert in the error log';

done_testing;
