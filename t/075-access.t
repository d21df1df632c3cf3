# Issue 7.7: /metrics and /status are served only on the metrics listener
# (127.0.0.1), never on the gateway port. Runs the embedded default through
# scripts/run-gateway.sh (`start`, then `stop`) on free loopback ports:
#  - the metrics listener answers /metrics, /status, /status.json and
#    /nginx_status, and is bound to 127.0.0.1 only;
#  - on the gateway port the same paths are plain file-system paths proxied
#    to the storage nodes (404 while no such file exists, counted as reads),
#    also with the metrics server's name in Host or in an absolute URI;
#  - a file named "metrics" in the file system comes back as that file.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Socket qw(SOL_SOCKET SO_RCVTIMEO);
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_value metric_sum repo_root);

my $ROOT = repo_root();
my $LIB  = "$ROOT/target/release/libshmprom.so";
my $RUN  = "$ROOT/scripts/run-gateway.sh";
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;
plan skip_all => "$RUN missing" unless -f $RUN;
for my $m (qw(ndk_http_module ngx_http_lua_module ngx_http_dav_ext_module)) {
    plan skip_all => "nginx module $m not installed" unless -f "/usr/lib/nginx/modules/$m.so";
}
plan skip_all => 'curl not installed' unless grep { -x "$_/curl" } split /:/, $ENV{PATH} // '';

my $t_start = time;

sub free_ports {
    my ($k) = @_;
    my @s = map { IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp')
                  or die "no free port: $!" } 1 .. $k;
    my @p = map { $_->sockport } @s;
    close $_ for @s;
    return @p;
}
sub slurp { open my $f, '<', $_[0] or return ''; local $/; return scalar <$f> }

my $base = $ENV{TMPDIR} && -d $ENV{TMPDIR} ? $ENV{TMPDIR} : '/tmp';
my $var = tempdir('shmprom-t075-XXXXXX', DIR => $base, CLEANUP => !$ENV{SHMPROM_KEEP});
chmod 0755, $var;
my ($GW, $MP, @NODES) = free_ports(5);
my %env = (GATEWAY_PORT => $GW, METRICS_PORT => $MP, NODE_PORTS => "@NODES", VAR_DIR => $var,
           START_TIMEOUT => 20, STOP_TIMEOUT => 10);

# run-gateway.sh CMD, bounded: returns (exit code, output); -1 on timeout
sub run_gateway {
    my ($cmd, $timeout) = @_;
    my $log = "$var/run-$cmd.log";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        POSIX::setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $log or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT;
        @ENV{ keys %env } = values %env;
        exec 'bash', $RUN, $cmd or POSIX::_exit(127);
    }
    my $status;
    my $done = wait_until(sub { my $r = waitpid($pid, WNOHANG); $status = $? if $r == $pid; $r == $pid || $r < 0 },
                          timeout => $timeout);
    if (!$done) {
        kill 'TERM', -$pid;
        waitpid($pid, 0);
        return (-1, slurp($log));
    }
    return (($status // 0) >> 8, slurp($log));
}

# nginx masters listed in VAR_DIR/pids whose command line names this VAR_DIR
sub our_pids {
    my @p;
    for my $line (split /\n/, slurp("$var/pids")) {
        my ($name, $pid) = $line =~ /^(\S+)\s+(\d+)\s*$/ or next;
        (my $cmd = slurp("/proc/$pid/cmdline")) =~ tr/\0/ /;
        push @p, $pid if index($cmd, $var) >= 0;
    }
    return @p;
}

my $stopped = 0;
END {
    local $?;
    if (!$stopped && -d $var) {
        run_gateway('stop', 40);
        my @left = our_pids();
        if (@left) {
            kill 'TERM', @left;
            wait_until(sub { !grep { kill 0, $_ } @left }, timeout => 10) or kill 'KILL', @left;
        }
    }
}

my ($rc, $out) = run_gateway('start', 90);
is($rc, 0, "run-gateway.sh start (gateway $GW, metrics $MP, nodes @NODES)") or do {
    diag $out;
    diag "--- gateway.error.log\n" . slurp("$var/logs/gateway.error.log");
    done_testing;
    exit;
};

my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);
sub get { my ($port, $path, %h) = @_; return $http->get("http://127.0.0.1:$port$path", { headers => \%h }) }

# raw request (absolute URIs, odd Host headers)
sub raw {
    my ($port, $req) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5)
        or return (599, '');
    setsockopt($s, SOL_SOCKET, SO_RCVTIMEO, pack('l!l!', 10, 0));
    print {$s} $req;
    my $buf = '';
    for (1 .. 10_000) { my $r = sysread($s, $buf, 65536, length $buf); last unless $r }
    close $s;
    my ($code) = $buf =~ m{^HTTP/1\.[01] (\d{3})};
    return ($code // 0, $buf);
}

sub looks_like_exposition { my ($b) = @_; return ($b // '') =~ /^# TYPE |^shmprom_|^dfs_gateway_/m }

# ---------------------------------------------------------------- the metrics listener
my $m = get($MP, '/metrics');
is($m->{status}, 200, 'GET /metrics on the metrics listener: 200');
like($m->{headers}{'content-type'} // '', qr{^text/plain; version=0\.0\.4}, 'Prometheus text Content-Type');
my $p0 = eval { parse_metrics($m->{content}) };
ok($p0 && $p0->{type}{dfs_gateway_requests_total}, 'the exposition parses and has the gateway families') or diag $@;
my $has_status = -f "$ROOT/lua/resty/shmprom/status.lua";
SKIP: {
    skip 'lua/resty/shmprom/status.lua not there: /status is 404 by design', 2 unless $has_status;
    my $s = get($MP, '/status');
    is($s->{status}, 200, 'GET /status on the metrics listener: 200');
    my $sj = get($MP, '/status.json');
    is($sj->{status}, 200, 'GET /status.json on the metrics listener: 200');
}
is(get($MP, '/nginx_status')->{status}, 200, 'GET /nginx_status on the metrics listener: 200');

# bound to loopback only
sub listeners {
    my ($port) = @_;
    my @l;
    for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
        for my $line (split /\n/, slurp($f)) {
            my ($local, $st) = (split ' ', $line)[1, 3];
            next unless defined $st && $st eq '0A';    # LISTEN
            my ($addr, $hexport) = split /:/, $local;
            push @l, $addr if hex($hexport) == $port;
        }
    }
    return @l;
}
is_deeply([ sort { $a cmp $b } listeners($MP) ], ['0100007F'], "the metrics port $MP listens on 127.0.0.1 only")
    or diag 'listeners: ' . join(' ', listeners($MP));
is_deeply([ sort { $a cmp $b } listeners($GW) ], ['0100007F'], "the gateway port $GW listens on 127.0.0.1 only");

# ---------------------------------------------------------------- the gateway port
my @paths = qw(/metrics /status /status.json /nginx_status /metrics/ /metrics?x=1 /Metrics);
my $probes = 0;
for my $path (@paths) {
    my $r = get($GW, $path);
    $probes++;
    is($r->{status}, 404, "GET $path on the gateway port: 404 from the file system");
    ok(!looks_like_exposition($r->{content}), "GET $path on the gateway port: no exposition");
}
for my $host ('dfs-gateway-metrics', "127.0.0.1:$MP", 'localhost') {
    my ($code, $buf) = raw($GW, "GET /metrics HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n\r\n");
    $probes++;
    is($code, 404, "Host: $host on the gateway port: 404");
    ok(!looks_like_exposition($buf), "Host: $host on the gateway port: no exposition");
}
{
    my ($code, $buf) = raw($GW, "GET http://127.0.0.1:$MP/metrics HTTP/1.1\r\nHost: 127.0.0.1:$MP\r\nConnection: close\r\n\r\n");
    $probes++;
    is($code, 404, 'absolute URI naming the metrics listener, sent to the gateway port: 404');
    ok(!looks_like_exposition($buf), '... no exposition');
}
{
    # no Host at all: the gateway passes the empty Host on, the storage
    # node refuses the request (400); anything but the exposition will do
    my ($code, $buf) = raw($GW, "GET /metrics HTTP/1.0\r\n\r\n");
    like($code, qr/^4\d\d$/, "HTTP/1.0 without Host on the gateway port: $code");
    ok(!looks_like_exposition($buf), '... no exposition');
}

# those requests went to the file system: counted as reads with status 404
my $counted;
ok(wait_until(sub {
    my $p = eval { parse_metrics(get($MP, '/metrics')->{content}) } or return 0;
    $counted = metric_value($p, 'dfs_gateway_requests_total', op => 'read', status => '404') // 0;
    $counted >= $probes;
}, timeout => 10), "the gateway counted them as file-system reads (read/404 = " . ($counted // 0) . ", sent $probes)");

# a file called "metrics" is just a file
my $put = $http->request('PUT', "http://127.0.0.1:$GW/metrics", { content => "just a file\n" });
like($put->{status}, qr/^20[14]$/, "PUT /metrics on the gateway port stores a file ($put->{status})");
my $g = get($GW, '/metrics');
is($g->{status}, 200, 'GET /metrics on the gateway port now finds it');
is($g->{content}, "just a file\n", 'and returns the file, not the exposition');
is(get($MP, '/metrics')->{status}, 200, 'the metrics listener still serves the exposition');
ok(looks_like_exposition(get($MP, '/metrics')->{content}), '... with its content');

# ---------------------------------------------------------------- stop
my @pids = our_pids();
cmp_ok(scalar @pids, '>=', 1 + @NODES, 'pids file lists the gateway and the nodes: ' . join(' ', @pids));
($rc, $out) = run_gateway('stop', 60);
is($rc, 0, 'run-gateway.sh stop') or diag $out;
ok(wait_until(sub { !grep { kill 0, $_ } @pids }, timeout => 15), 'every process it started has exited');
my $probe = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $MP, Proto => 'tcp', Timeout => 1);
ok(!$probe, 'nothing listens on the metrics port any more');
$stopped = 1;

my @err = grep { /\[(?:error|crit|alert|emerg)\]/ } split /\n/, slurp("$var/logs/gateway.error.log");
# 404s of the storage nodes are logged by them, not by the gateway
is(scalar @err, 0, 'no [error]/[crit]/[alert] in the gateway error log') or diag join "\n", @err[0 .. ($#err < 10 ? $#err : 9)];

diag sprintf('075-access.t total %.1f s', time - $t_start);
done_testing;
