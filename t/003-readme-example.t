#!/usr/bin/perl
# README.md's "A complete example" runs as written: the nginx block is taken
# from the README, only its ports (80, 9145, the upstream's 8000) are moved
# to free ones; 300 proxied requests with three statuses are counted exactly
# by host and status, observed in the latency histogram, and none is left
# in flight. Then family:labels's create_all example (creating many label
# sets in slices) runs as written and creates every label set it is given.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "$LIB not built (make build)" unless -f $LIB;

my $readme = do {
    open my $f, '<', repo_root() . '/README.md' or die "README.md: $!";
    local $/;
    <$f>;
};
my ($example) = $readme =~ /^A complete example, inside `http \{ \}`:\n\n```nginx\n(.*?)^```/ms;
ok($example, 'README.md has the complete example');
$example //= '';
like($example, qr/log_by_lua_block/, 'it records in the log phase');

# its ports, moved: the server on 80, the metrics on 9145, the upstream 8000
my $conf = $example;
my $moved = 0;
$moved += $conf =~ s/listen 80;/listen 127.0.0.1:\$PORT;/;
$moved += $conf =~ s/listen 127\.0\.0\.1:9145;/listen 127.0.0.1:\$PORT2;/;
$moved += $conf =~ s{proxy_pass http://127\.0\.0\.1:8000;}{proxy_pass http://127.0.0.1:\$PORT3;};
is($moved, 3, 'the example\'s three ports are where the test expects them');

my $n = ShmpromTest->new(
    workers           => 2,
    ports             => 3,
    no_default_server => 1,
    http              => $conf,
    servers           => <<'NGX',
    server {
        listen 127.0.0.1:$PORT3;
        location /missing { return 404 "no\n"; }
        location /broken { return 500 "bad\n"; }
        location / { return 200 "hello\n"; }
    }
NGX
);
$n->start_ok('nginx starts with the README example');

my %want = (200 => 200, 404 => 60, 500 => 40);
my %path = (200 => '/ok', 404 => '/missing', 500 => '/broken');
for my $st (sort keys %want) {
    my $r = $n->load(requests => $want{$st}, concurrency => 4, path => $path{$st}, host => 'files.example');
    is($r->{status}{$st} // 0, $want{$st}, "$want{$st} requests answered $st");
}

my $p;
ok(wait_until(sub {
    my $r = $n->get(['/metrics', 2]);
    return 0 unless $r->{status} == 200;
    $p = eval { parse_metrics($r->{body}) } or return 0;
    metric_sum($p, 'http_requests_total') >= 300;
}, timeout => 10), 'the metrics endpoint shows the requests');
$p ||= { samples => {}, list => [] };
for my $st (sort keys %want) {
    is(metric_value($p, 'http_requests_total', host => 'files.example', status => $st), $want{$st},
       "http_requests_total{host=files.example,status=$st} == $want{$st}");
}
is(metric_value($p, 'http_request_duration_seconds_count', host => 'files.example'), 300,
   'every request observed in the latency histogram');
is(metric_value($p, 'http_request_duration_seconds_bucket', host => 'files.example', le => '+Inf'), 300,
   '+Inf bucket == count');
is(metric_value($p, 'http_requests_in_flight'), 0, 'none in flight');
my @bad = $n->error_lines;
is(scalar @bad, 0, 'no error lines') or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];
ok($n->stop, 'nginx stops');

# family:labels's "Creating many label sets at once": its create_all runs as
# written in a content handler, yields between slices and creates every
# label set it is given
my ($many) = $readme =~ /^\*\*Creating many label sets at once\*\*.*?```lua\n(.*?)^```/ms;
ok($many, 'README.md has the create_all example');
$many //= '';
like($many, qr/ngx\.sleep\(0\.001\)/, 'it pauses between slices');
my $N = 3_500;
my $m = ShmpromTest->new(
    workers => 1,
    init    => <<'LUA',
        local shmprom = require "resty.shmprom"
        many_m = shmprom.new{ zone = "readme_many", size = "16m" }
        many_h = many_m:histogram("readme_many_seconds", "slices", { "node", "op" })
        sleeps = 0
LUA
    init_worker => 'many_m:init_worker()',
    server      => <<"NGX",
        location = /create {
            content_by_lua_block {
$many
                local sets = {}
                for i = 1, $N do
                    sets[i] = { "node" .. i, "read" }
                end
                local sleep = ngx.sleep
                ngx.sleep = function(t) sleeps = sleeps + 1; return sleep(t) end
                create_all(many_h, sets)
                ngx.sleep = sleep
                ngx.say("slept ", sleeps)
            }
        }
        location = /metrics { content_by_lua_block { many_m:collect() } }
NGX
);
$m->start_ok('nginx starts with the create_all example');
my $r = $m->get('/create');
is($r->{status}, 200, 'create_all answers 200');
like($r->{body} // '', qr/^slept 3$/m, 'it slept between its slices: 3 pauses for 3,500 label sets');
$r = $m->get('/metrics');
my $q = eval { parse_metrics($r->{body}) } || { samples => {}, list => [] };
is(metric_value($q, 'shmprom_series', family => 'readme_many_seconds'), $N,
   "all $N label sets created");
my @errs = metric_series($q, 'shmprom_errors_total');
ok(@errs > 0, 'the zone exports shmprom_errors_total');
is(metric_sum($q, 'shmprom_errors_total'), 0, 'no error counted');
@bad = $m->error_lines;
is(scalar @bad, 0, 'no error lines') or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];
ok($m->stop, 'nginx stops');
done_testing;
