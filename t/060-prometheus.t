#!/usr/bin/perl
# End to end with a real Prometheus (Debian's prometheus package):
#   two gateway instances (scripts/run-gateway.sh, each with its own three
#   storage nodes), a node_exporter and a Prometheus, all on 127.0.0.1 on
#   free ports, scraping every second and evaluating
#   nginx-conf/rules/dfs_gateway.rules.yml every second;
#   WebDAV traffic of every kind sent with curl;
# then, asking Prometheus' HTTP API (polling with deadlines, no fixed sleeps):
#   - every target is up;
#   - every rule of the rules file is loaded and healthy, and every
#     recording rule returns data;
#   - the request counters Prometheus scraped equal the requests sent, per
#     op and per gateway, and op:dfs_gateway_requests:rate5m matches the
#     rate of the traffic sent;
#   - every PromQL expression of the Grafana dashboard runs without error
#     (scripts/dashboard-exprs.pl), and those that must have data have it.
#
# Skipped unless target/release/libshmprom.so and scripts/run-gateway.sh
# exist (and prometheus, prometheus-node-exporter, nginx and curl are
# installed).
#
# run-gateway.sh is driven through its environment (docs/contract.md):
#   GATEWAY_PORT  the WebDAV port          METRICS_PORT  /metrics and /status
#   NODE_PORTS    the storage node ports   VAR_DIR       all state and logs
#   START_ONLY=1  start in the background, return once everything accepts
# NODE_PORTS is space separated. The test stops exactly what it started:
# `run-gateway.sh stop` for each VAR_DIR, then, should anything be left, the
# pids listed in VAR_DIR/pids or VAR_DIR/**/*.pid whose command line or
# environment names this test's VAR_DIR.
use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Find ();
use File::Spec;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use lib File::Spec->catdir(dirname(__FILE__), 'lib');
use ShmpromTest qw(wait_until);

my $ROOT = abs_path(File::Spec->catdir(dirname(__FILE__), File::Spec->updir));
my $LIB = "$ROOT/target/release/libshmprom.so";
my $RUN_GATEWAY = "$ROOT/scripts/run-gateway.sh";
my $RULES = "$ROOT/nginx-conf/rules/dfs_gateway.rules.yml";
my $EXTRACT = "$ROOT/scripts/dashboard-exprs.pl";
my $DASHBOARD = "$ROOT/nginx-conf/dashboards/dfs-gateway.json";

sub which {
    my ($prog) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$prog" if -x "$d/$prog";
    }
    return;
}

plan skip_all => "$LIB not built (make build)" unless -f $LIB;
plan skip_all => "$RUN_GATEWAY not there yet" unless -f $RUN_GATEWAY;
my $PROMETHEUS = which('prometheus')
    or plan skip_all => 'prometheus not installed (Debian package prometheus)';
my $NODE_EXPORTER = which('prometheus-node-exporter') // which('node_exporter')
    or plan skip_all => 'node_exporter not installed (prometheus-node-exporter)';
my $CURL = which('curl') or plan skip_all => 'curl not installed';

# ---- local helpers ---------------------------------------------------------------

# n distinct free loopback ports (all held open until all are chosen)
sub free_ports {
    my ($n) = @_;
    my @socks = map {
        IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0,
                              Proto => 'tcp', ReuseAddr => 1) or die "no free port: $!"
    } 1 .. $n;
    my @ports = map { $_->sockport } @socks;
    close $_ for @socks;
    return @ports;
}

sub slurp { open my $f, '<', $_[0] or return ''; local $/; return scalar <$f> }

sub spit {
    my ($file, $text) = @_;
    open my $f, '>', $file or die "$file: $!";
    print $f $text;
    close $f or die "$file: $!";
}

# Starts @cmd in a new session (so its process group id is its pid), with
# stdout and stderr to $log and %env added to the environment. Returns the pid.
my %children;    # pid => name
sub spawn {
    my ($name, $log, $env, @cmd) = @_;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        POSIX::setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $log or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT;
        @ENV{ keys %$env } = values %$env;
        exec @cmd or POSIX::_exit(127);
    }
    $children{$pid} = $name;
    return $pid;
}

sub reaped {
    my ($pid) = @_;
    my $r = waitpid($pid, WNOHANG);
    return $r == $pid || $r == -1;
}

# Stops a child we spawned and everything in its process group.
sub stop_child {
    my ($pid) = @_;
    return unless $children{$pid};
    if (!reaped($pid)) {
        kill 'TERM', -$pid or kill 'TERM', $pid;
        if (!wait_until(sub { reaped($pid) }, timeout => 15, interval => 0.05)) {
            kill 'KILL', -$pid or kill 'KILL', $pid;
            waitpid($pid, 0);
        }
    }
    delete $children{$pid};
}

sub _alive_proc {
    my ($pid) = @_;
    my $stat = slurp("/proc/$pid/stat");
    return 0 unless length $stat;
    my ($state) = $stat =~ /\)\s+(\S)/;
    return ($state // 'X') ne 'Z';
}

# Daemons a gateway left behind: `run-gateway.sh stop`, then the pids listed
# in VAR_DIR/pids ("NAME PID" lines) or in *.pid files under VAR_DIR whose
# command line or environment names that VAR_DIR.
sub stop_var_dir_daemons {
    my ($var_dir, $env) = @_;
    return unless -d $var_dir;
    if (-f "$var_dir/pids") {
        my $pid = spawn("run-gateway.sh stop", "$var_dir/stop.log", $env,
                        'bash', $RUN_GATEWAY, 'stop');
        wait_until(sub { reaped($pid) }, timeout => 60, interval => 0.05)
            or diag "run-gateway.sh stop did not finish";
        stop_child($pid);
    }
    my @candidates;
    for my $line (split /\n/, slurp("$var_dir/pids")) {
        push @candidates, $1 if $line =~ /^\S+\s+(\d+)\s*$/;
    }
    my @pidfiles;
    File::Find::find({ no_chdir => 1,
                       wanted => sub { push @pidfiles, $_ if /\.pid$/ && -f $_ } }, $var_dir);
    for my $f (@pidfiles) {
        push @candidates, $1 if slurp($f) =~ /^\s*(\d+)/;
    }
    my @pids;
    for my $pid (@candidates) {
        next if $pid <= 1 || $pid == $$ || !_alive_proc($pid);
        (my $cmdline = slurp("/proc/$pid/cmdline")) =~ tr/\0/ /;
        (my $environ = slurp("/proc/$pid/environ")) =~ tr/\0/\n/;
        if (index($cmdline, $var_dir) >= 0 || $environ =~ /^VAR_DIR=\Q$var_dir\E$/m) {
            push @pids, $pid;
        }
    }
    return unless @pids;
    diag "stopping leftover pids @pids of $var_dir";
    kill 'TERM', @pids;
    my $gone = wait_until(sub { !grep { _alive_proc($_) } @pids }, timeout => 15,
                          interval => 0.05);
    kill 'KILL', grep { _alive_proc($_) } @pids unless $gone;
}

my @gw;
sub stop_all {
    stop_child($_) for sort { $b <=> $a } keys %children;
    stop_var_dir_daemons($_->{var}, $_->{env}) for @gw;
    @gw = ();
}
END { local $?; stop_all() }
$SIG{INT} = $SIG{TERM} = sub { stop_all(); exit 1 };

my $http = HTTP::Tiny->new(timeout => 10);
my $json = JSON::PP->new;

# ---- start everything ------------------------------------------------------------

my $dir = tempdir('shmprom-t060-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;

my @ports = free_ports(12);
for my $i (1, 2) {
    my $var = "$dir/gw$i";
    mkdir $var or die "$var: $!";
    my %g = (name => "gw$i", var => $var, port => shift @ports,
             metrics => shift @ports, nodes => [ splice @ports, 0, 3 ]);
    $g{instance} = "127.0.0.1:$g{metrics}";
    $g{url} = "http://127.0.0.1:$g{port}";
    $g{log} = "$dir/gw$i.log";
    $g{env} = { GATEWAY_PORT => $g{port}, METRICS_PORT => $g{metrics},
                NODE_PORTS => "@{ $g{nodes} }", VAR_DIR => $var, START_ONLY => 1 };
    $g{pid} = spawn("run-gateway.sh gw$i", $g{log}, $g{env}, 'bash', $RUN_GATEWAY);
    push @gw, \%g;
}
my ($node_exporter_port, $prom_port) = @ports;

mkdir "$dir/textfile";
spawn('node_exporter', "$dir/node_exporter.log", {},
      $NODE_EXPORTER, "--web.listen-address=127.0.0.1:$node_exporter_port",
      "--collector.textfile.directory=$dir/textfile");

sub diag_logs {
    for my $g (@gw) {
        diag "--- $g->{name} (run-gateway.sh output)\n" . slurp($g->{log});
        my @err;
        File::Find::find({ no_chdir => 1, wanted => sub { push @err, $_ if /error\.log$/ } },
                         $g->{var}) if -d $g->{var};
        diag "--- $_\n" . substr(slurp($_), -4000) for @err;
    }
    diag "--- prometheus\n" . substr(slurp("$dir/prometheus.log"), -4000);
}

# Ends this test file early (the others in the run go on): what started
# is stopped, the failures so far stand.
sub give_up {
    my ($why, $logs) = @_;
    diag_logs() if $logs;
    diag "giving up: $why";
    stop_all();
    done_testing();
    exit 1;
}

# Gateways: run-gateway.sh returns once the storage nodes and /metrics
# answer (sending nothing to the WebDAV port: the counters start at zero).
for my $g (@gw) {
    my $status;
    my $done = wait_until(sub {
        my $r = waitpid($g->{pid}, WNOHANG);
        $status = $? if $r == $g->{pid};
        return $r == $g->{pid} || $r == -1;
    }, timeout => 120, interval => 0.05);
    delete $children{ $g->{pid} } if $done;
    my $m = $http->get("http://127.0.0.1:$g->{metrics}/metrics");
    ok $done && defined $status && $status == 0 && $m->{status} == 200
        && $m->{content} =~ /^shmprom_zone_bytes/m,
        "$g->{name} started: WebDAV on :$g->{port}, metrics on :$g->{metrics}"
        or give_up("$g->{name} did not start", 1);
}
ok wait_until(sub { $http->get("http://127.0.0.1:$node_exporter_port/metrics")->{status} == 200 },
              timeout => 30), 'node_exporter up'
    or diag slurp("$dir/node_exporter.log");

# Prometheus with the repository's recording and alerting rules
spit("$dir/prometheus.yml", <<"YAML");
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $RULES
scrape_configs:
  - job_name: dfs_gateway
    static_configs:
      - targets: ['$gw[0]{instance}', '$gw[1]{instance}']
  - job_name: node
    static_configs:
      - targets: ['127.0.0.1:$node_exporter_port']
YAML
mkdir "$dir/prom-data";
spawn('prometheus', "$dir/prometheus.log", {},
                     $PROMETHEUS, "--config.file=$dir/prometheus.yml",
                     "--storage.tsdb.path=$dir/prom-data",
                     "--web.listen-address=127.0.0.1:$prom_port",
                     '--log.level=warn');
my $PROM = "http://127.0.0.1:$prom_port";

# Instant query: returns the result list, or undef and the error.
sub query {
    my ($q) = @_;
    my $r = $http->post_form("$PROM/api/v1/query", { query => $q });
    my $d = eval { $json->decode($r->{content}) };
    return (undef, "HTTP $r->{status}: $r->{content}") unless $d;
    return (undef, "$d->{errorType}: $d->{error}") if ($d->{status} // '') ne 'success';
    return ($d->{data}{result}, undef, $d->{warnings});
}

sub vector_by {
    my ($q, @labels) = @_;
    my ($res) = query($q);
    my %v;
    for my $s (@{ $res // [] }) {
        $v{ join ',', map { $s->{metric}{$_} // '' } @labels } = $s->{value}[1];
    }
    return \%v;
}

ok wait_until(sub { $http->get("$PROM/-/ready")->{status} == 200 }, timeout => 60),
    'prometheus ready'
    or give_up('prometheus did not start', 1);

# every target up
{
    my $last;
    my $ok = wait_until(sub {
        my $r = $http->get("$PROM/api/v1/targets?state=active");
        my $d = eval { $json->decode($r->{content}) } or return 0;
        $last = $d->{data}{activeTargets} // [];
        return @$last == 3 && !grep { $_->{health} ne 'up' } @$last;
    }, timeout => 60);
    ok $ok, 'all 3 targets up (2 gateways, node_exporter)'
        or diag explain [ map { [ $_->{scrapeUrl}, $_->{health}, $_->{lastError} ] } @{ $last // [] } ];
    my $up = vector_by('up', 'job', 'instance');
    is $up->{"dfs_gateway,$_->{instance}"}, 1, "up{instance=\"$_->{instance}\"} == 1" for @gw;
    is $up->{"node,127.0.0.1:$node_exporter_port"}, 1, 'node_exporter scraped';
}

# ---- traffic -------------------------------------------------------------------

# One WebDAV request with curl; returns the HTTP status (dies if curl fails).
sub curl {
    my ($method, $url, %o) = @_;
    my @cmd = ($CURL, '-sS', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '20',
               $method eq 'HEAD' ? ('-I') : ('-X', $method));
    push @cmd, '-H', "$_: $o{headers}{$_}" for sort keys %{ $o{headers} // {} };
    push @cmd, '--data-binary', "\@$o{file}" if $o{file};
    push @cmd, '--data-binary', $o{body}, '-H', 'Content-Type: application/xml'
        if defined $o{body};
    push @cmd, $url;
    my $pid = open(my $fh, '-|') // die "fork: $!";
    if (!$pid) { open STDERR, '>&', \*STDOUT; exec @cmd or POSIX::_exit(127) }
    local $/;
    my $out = <$fh> // '';
    close $fh;
    die "curl @cmd failed (exit " . ($? >> 8) . "): $out\n" if $?;
    return $out =~ /(\d{3})\s*$/ ? $1 : 0;
}

my %sent;    # "$instance,$op" => count
my $LOCK_BODY = '<?xml version="1.0" encoding="utf-8"?>'
    . '<D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
    . '<D:locktype><D:write/></D:locktype><D:owner>t060</D:owner></D:lockinfo>';

# One round of every kind of request on gateway $g, files named by $tag.
sub round {
    my ($g, $tag, $size) = @_;
    my $base = "$g->{url}/t060";
    my $file = "$dir/body-$size";
    spit($file, 'x' x $size) unless -f $file;
    my $n = sub { $sent{"$g->{instance},$_[0]"}++ };
    my $f = "$base/f$tag.bin";
    curl('MKCOL', "$base/d$tag/");                          $n->('mkdir');
    curl('PUT', $f, file => $file);                         $n->('write');
    curl('GET', $f);                                        $n->('read');
    curl('HEAD', $f);                                       $n->('stat');
    curl('PROPFIND', $f, headers => { Depth => 0 });        $n->('stat');
    curl('PROPFIND', "$base/", headers => { Depth => 1 });  $n->('list');
    curl('COPY', $f, headers => { Destination => "$base/c$tag.bin" });  $n->('copy');
    curl('MOVE', "$base/c$tag.bin", headers => { Destination => "$base/m$tag.bin" });
                                                            $n->('rename');
    curl('DELETE', "$base/m$tag.bin");                      $n->('delete');
    curl('OPTIONS', $f);                                    $n->('meta');
    curl('LOCK', "$base/l$tag.bin", body => $LOCK_BODY, headers => { Timeout => 'Second-60' });
                                                            $n->('lock');
    curl('PATCH', $f);                                      $n->('other');
}

my @OPS = qw(read stat write delete list mkdir rename copy lock meta other);

# warm-up: creates the series (and the collection directory) on both gateways
for my $g (@gw) {
    curl('MKCOL', "$g->{url}/t060/");
    $sent{"$g->{instance},mkdir"}++;
    round($g, 'warm', 1000);
}

# wait until Prometheus holds every op series of both gateways, so that the
# measured traffic below lands between samples and shows in rate()
{
    my $want = join ' ', sort map { my $g = $_; map { "$g->{instance},$_" } @OPS } @gw;
    my $got;
    ok wait_until(sub {
        $got = vector_by('sum by (instance, op) (dfs_gateway_requests_total)', 'instance', 'op');
        return join(' ', sort keys %$got) eq $want;
    }, timeout => 30), 'Prometheus sees every op of both gateways'
        or diag explain { want => $want, got => [ sort keys %{ $got // {} } ] };
}

# measured traffic: 10 rounds per gateway, bodies from 100 B to 256 KiB
my $t_start = time;
my %measured;
{
    my %before = %sent;
    my @sizes = (100, 1000, 4096, 10_000, 65_536, 100_000, 262_144, 512, 2048, 30_000);
    for my $r (0 .. 9) {
        round($_, "r$r", $sizes[$r]) for @gw;
    }
    for my $k (keys %sent) {
        my (undef, $op) = split /,/, $k;
        $measured{$op} += $sent{$k} - ($before{$k} // 0);
    }
}
{
    my $total = 0;
    $total += $_ for values %measured;
    pass sprintf 'sent %d measured requests in %.1fs', $total, time - $t_start;
}

# ---- the numbers in Prometheus -------------------------------------------------

# exact: the scraped counters equal what was sent, per gateway and op
{
    my $got;
    my $ok = wait_until(sub {
        $got = vector_by('sum by (instance, op) (dfs_gateway_requests_total)', 'instance', 'op');
        return !grep { ($got->{$_} // -1) != $sent{$_} } keys %sent;
    }, timeout => 30);
    ok $ok, 'dfs_gateway_requests_total in Prometheus == requests sent, per gateway and op';
    for my $k (sort keys %sent) {
        is $got->{$k}, $sent{$k}, "  $k";
    }
}

# the status page's JSON reads the same zone: the same counts
for my $g (@gw) {
    my $r = $http->get("http://127.0.0.1:$g->{metrics}/status.json");
    my $st = eval { $json->decode($r->{content}) } // {};
    is $r->{status}, 200, "$g->{name}: /status.json";
    my %want = map { (split /,/)[1] => $sent{$_} } grep { /^\Q$g->{instance}\E,/ } keys %sent;
    my %got = map { $_ => $st->{ops}{$_}{requests} } keys %{ $st->{ops} // {} };
    is_deeply \%got, \%want, "$g->{name}: /status.json requests per op == requests sent";
    is $st->{nodes_total}, 3, "$g->{name}: /status.json lists the 3 storage nodes";
}

# every rule loaded and healthy
my @recording;
{
    my @want_records = slurp($RULES) =~ /^\s*-\s*record:\s*(\S+)/mg;
    my @want_alerts = slurp($RULES) =~ /^\s*-\s*alert:\s*(\S+)/mg;
    my (%rules, $last);
    my $ok = wait_until(sub {
        my $d = eval { $json->decode($http->get("$PROM/api/v1/rules")->{content}) } or return 0;
        %rules = ();
        for my $g (@{ $d->{data}{groups} // [] }) {
            for my $r (@{ $g->{rules} }) {
                $rules{ $r->{name} } = $r;
            }
        }
        # evaluated at least once, none failing
        return 0 if grep { !$rules{$_} || ($rules{$_}{health} // '') ne 'ok' }
                        @want_records, @want_alerts;
        return 1;
    }, timeout => 30);
    ok $ok, scalar(@want_records) . ' recording and ' . scalar(@want_alerts)
        . ' alerting rules loaded and healthy'
        or diag explain { map { $_ => [ $rules{$_}{health}, $rules{$_}{lastError} ] }
                          grep { $rules{$_} } @want_records, @want_alerts };
    @recording = @want_records;
}

# every recording rule returns data
{
    my %empty;
    my $ok = wait_until(sub {
        %empty = ();
        for my $r (@recording) {
            my ($res, $err) = query($r);
            $empty{$r} = $err // 'no data' unless $res && @$res;
        }
        return !%empty;
    }, timeout => 60);
    ok $ok, 'every recording rule returns data' or diag explain \%empty;
    for my $r (@recording) {
        ok !$empty{$r}, "  $r";
    }
}

# the per-op rate matches the traffic sent: the measured requests spread over
# the 5m window. Prometheus extrapolates a young series by up to 1.5 scrape
# intervals, which fades as samples accumulate: poll until within 10 %.
{
    my $got;
    my $ok = wait_until(sub {
        $got = vector_by('op:dfs_gateway_requests:rate5m', 'op');
        for my $op (@OPS) {
            my $want = $measured{$op} / 300;
            my $v = $got->{$op} // return 0;
            return 0 if abs($v - $want) > 0.10 * $want;
        }
        return 1;
    }, timeout => 90, interval => 1);
    ok $ok, 'op:dfs_gateway_requests:rate5m matches the requests sent (within 10 %)';
    for my $op (@OPS) {
        my $want = $measured{$op} / 300;
        ok defined $got->{$op} && abs($got->{$op} - $want) <= 0.10 * $want,
            sprintf '  %-6s %.4f/s for %.4f/s sent', $op, $got->{$op} // -1, $want;
    }
    my $inst = vector_by('instance_op:dfs_gateway_requests:rate5m', 'instance', 'op');
    for my $g (@gw) {
        ok +($inst->{"$g->{instance},read"} // 0) > 0, "instance_op rate for $g->{name}";
    }
    my $in = vector_by('op:dfs_gateway_received_bytes:rate5m', 'op');
    my $out = vector_by('op:dfs_gateway_sent_bytes:rate5m', 'op');
    ok +($in->{write} // 0) > ($in->{read} // 0), 'writes bring the bytes in';
    ok +($out->{read} // 0) > ($out->{write} // 0), 'reads send the bytes out';
    my $nodes = vector_by('node:dfs_gateway_upstream_attempts:rate5m', 'node');
    ok scalar(grep { $_ > 0 } values %$nodes) >= 2, 'attempts recorded per storage node'
        or diag explain $nodes;
}

# no alert fires on this healthy setup (the `for` alerts cannot fire this
# quickly; ShmpromMetricsDropped, which has none, would mean a full zone)
{
    my ($res, $err) = query('ALERTS{alertstate="firing"}');
    is $err, undef, 'ALERTS query';
    is_deeply [ map { $_->{metric}{alertname} } @{ $res // [] } ], [], 'no alert firing';
}

# ---- the dashboard's expressions ------------------------------------------------

{
    my $out = do {
        my $pid = open(my $fh, '-|', $^X, $EXTRACT, '--json', $DASHBOARD) // die $!;
        local $/;
        my $o = <$fh>;
        close $fh;
        $o;
    };
    my $list = eval { $json->decode($out) } // [];
    ok @$list > 20, scalar(@$list) . ' dashboard expressions';

    # Expressions that may rightly return nothing here: errors, failures,
    # retries and drops did not happen; node_exporter in a container may have
    # no block devices.
    my $may_be_empty = qr/status=~"5\.\."|_failures_total|_retries_total|_dropped_total
                         |shmprom_errors_total|node_disk_|node_filesystem_/x;
    for my $e (@$list) {
        my $what = $e->{panel} ? "panel \"$e->{panel}\" $e->{refId}" : "variable $e->{variable}";
        my ($res, $err) = query($e->{expr});
        is $err, undef, "$what: no error" or diag $e->{expr};
        next if $err || $e->{expr} =~ $may_be_empty;
        # [1m] windows need two samples: poll briefly before calling it empty
        my $has = ($res && @$res) || wait_until(sub {
            my ($r) = query($e->{expr});
            return $r && @$r;
        }, timeout => 20, interval => 0.5);
        ok $has, "$what: returns data" or diag $e->{expr};
    }
}

stop_all();
done_testing;
