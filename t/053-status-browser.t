#!/usr/bin/perl
# The status page of the real gateway in a real browser (Debian's chromium,
# headless):
#   - starts the embedded default (scripts/run-gateway.sh start) on free
#     loopback ports with a temporary VAR_DIR, and stops it at the end, also
#     when a check fails or the test is interrupted;
#   - sends WebDAV traffic with curl (MKCOL, PUT, GET, HEAD, PROPFIND with
#     Depth 0 and 1, a GET that answers 404) and checks /status.json counts
#     it per op;
#   - checks that /status.json refreshes dfs_gateway_connections itself:
#     idle connections opened on the metrics listener show up in it (and go
#     away again) without any /metrics scrape in between;
#   - loads http://127.0.0.1:METRICS_PORT/status in headless Chromium with a
#     virtual time budget of 5 s, so the page's script polls the JSON three
#     times (at 0, 2 and 4 s), and dumps the DOM: every cumulative number the
#     page shows (elements with data-k = JSON path, data-v = raw value) must
#     equal what /status.json holds right after, and the page must show
#     rates (which needs two successful polls);
#   - saves a screenshot (1280x1600) to t/tmp/053-status.png and checks it
#     is a PNG of that size and not trivially small.
#
# Skipped when target/release/libshmprom.so, scripts/run-gateway.sh, curl
# or chromium (/usr/bin/chromium, or $CHROMIUM) is missing;
# scripts/install-deps.sh installs chromium.
#
# Chromium runs as a child in its own session (process group = its pid),
# waited for with a deadline; on timeout that process group is killed.
# Every address is 127.0.0.1; Chromium resolves no host name.
use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Spec;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time);
use lib File::Spec->catdir(dirname(__FILE__), 'lib');
use ShmpromTest qw(wait_until);

my $T0 = time;
my $ROOT = abs_path(File::Spec->catdir(dirname(__FILE__), File::Spec->updir));
my $LIB = "$ROOT/target/release/libshmprom.so";
my $RUN_GATEWAY = "$ROOT/scripts/run-gateway.sh";
my $CHROMIUM = $ENV{CHROMIUM} // '/usr/bin/chromium';
my $SHOT_DIR = "$ROOT/t/tmp";
my $SHOT = "$SHOT_DIR/053-status.png";
my $DOM_COPY = "$SHOT_DIR/053-status.html";

sub which {
    my ($prog) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$prog" if -x "$d/$prog";
    }
    return;
}

plan skip_all => "$LIB not built (make build)" unless -f $LIB;
plan skip_all => "$RUN_GATEWAY missing" unless -f $RUN_GATEWAY;
plan skip_all => "chromium not installed at $CHROMIUM (scripts/install-deps.sh"
    . " installs Debian's chromium)" unless -x $CHROMIUM;
my $CURL = which('curl') or plan skip_all => 'curl not installed';

# ---- helpers ----------------------------------------------------------------------

sub slurp { open my $f, '<', $_[0] or return ''; local $/; return scalar <$f> }

sub spit {
    my ($file, $text) = @_;
    open my $f, '>', $file or die "$file: $!";
    print $f $text;
    close $f or die "$file: $!";
}

# n distinct free loopback ports (all held until all are chosen)
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

# Starts @cmd in a new session (its process group id is its pid) with
# stdin from /dev/null, stdout to $out, stderr to $err and %$env added to
# the environment. Returns the pid.
my %children;    # pid => name, until reaped
sub spawn {
    my ($name, $out, $err, $env, @cmd) = @_;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        POSIX::setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $out or POSIX::_exit(126);
        open STDERR, '>>', $err or POSIX::_exit(126);
        @ENV{ keys %$env } = values %$env;
        exec @cmd or POSIX::_exit(127);
    }
    $children{$pid} = $name;
    return $pid;
}

# pids of the live (not zombie) processes in process group $pgid
sub group_members {
    my ($pgid) = @_;
    my @pids;
    opendir my $dh, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $dh) {
        my $stat = slurp("/proc/$p/stat");
        my $r = rindex($stat, ')');
        next if $r < 0;
        my ($state, undef, $pgrp) = split ' ', substr($stat, $r + 2);
        push @pids, $p if defined $pgrp && $pgrp == $pgid && $state ne 'Z';
    }
    return @pids;
}

# Waits up to $timeout s for child $pid to exit; then (or at once when
# $timeout is 0) TERM, later KILL, to its process group. Returns its wait
# status, or undef when it had to be killed.
sub finish_child {
    my ($pid, $timeout) = @_;
    return unless $children{$pid};
    my $status;
    my $reaped = sub {
        my $r = waitpid($pid, WNOHANG);
        $status = $? if $r == $pid;
        return $r == $pid || $r == -1;
    };
    my $exited = wait_until($reaped, timeout => $timeout, interval => 0.02);
    if (!$exited) {
        diag "$children{$pid} (pid $pid) still runs after ${timeout}s: stopping it";
        kill 'TERM', -$pid;
        if (!wait_until($reaped, timeout => 5, interval => 0.05)) {
            kill 'KILL', -$pid;
            waitpid($pid, 0);
        }
        $status = undef;
    }
    # helpers left in the group (Chromium's zygote, renderer, GPU process)
    # follow the browser out; wait for them, then kill what stays
    if (!wait_until(sub { !group_members($pid) }, timeout => 5, interval => 0.05)) {
        my @left = group_members($pid);
        diag "killing leftover processes of group $pid: @left";
        kill 'KILL', -$pid;
    }
    delete $children{$pid};
    return $status;
}

# ---- the gateway ------------------------------------------------------------------

my $dir = tempdir('shmprom-t053-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
my $VAR = "$dir/var";
mkdir $VAR or die "$VAR: $!";
my ($GW_PORT, $M_PORT, @NODE_PORTS) = free_ports(5);
my %GW_ENV = (GATEWAY_PORT => $GW_PORT, METRICS_PORT => $M_PORT,
              NODE_PORTS => "@NODE_PORTS", VAR_DIR => $VAR);
my $GW = "http://127.0.0.1:$GW_PORT";
my $M = "http://127.0.0.1:$M_PORT";
my $started = 0;

sub alive_pid {
    my ($pid) = @_;
    my $stat = slurp("/proc/$pid/stat");
    return 0 unless length $stat;
    my ($state) = $stat =~ /\)\s+(\S)/;
    return ($state // 'Z') ne 'Z';
}

# `run-gateway.sh stop`, then any pid of VAR_DIR/pids that still runs an
# nginx of this VAR_DIR (command line names it)
sub stop_gateway {
    return unless $started;
    $started = 0;
    my $pid = spawn('run-gateway.sh stop', '/dev/null', "$dir/stop.log", \%GW_ENV,
                    'bash', $RUN_GATEWAY, 'stop');
    my $st = finish_child($pid, 60);
    diag "run-gateway.sh stop failed:\n" . slurp("$dir/stop.log")
        unless defined $st && $st == 0;
    my @left;
    for my $line (split /\n/, slurp("$VAR/pids")) {
        my ($p) = $line =~ /^\S+\s+(\d+)\s*$/ or next;
        next if $p <= 1 || !alive_pid($p);
        (my $cmd = slurp("/proc/$p/cmdline")) =~ tr/\0/ /;
        push @left, $p if index($cmd, $VAR) >= 0;
    }
    return unless @left;
    diag "stopping leftover gateway pids @left";
    kill 'TERM', @left;
    wait_until(sub { !grep { alive_pid($_) } @left }, timeout => 10, interval => 0.05)
        or kill 'KILL', grep { alive_pid($_) } @left;
}

sub stop_everything {
    finish_child($_, 0) for keys %children;
    stop_gateway();
}
END { local $?; stop_everything() }
$SIG{INT} = $SIG{TERM} = sub { stop_everything(); exit 1 };

sub give_up {
    my ($why) = @_;
    diag "--- run-gateway.sh\n" . slurp("$dir/start.log");
    diag "--- $_\n" . substr(slurp($_), -3000) for glob("$VAR/logs/*error.log");
    diag "giving up: $why";
    stop_everything();
    done_testing();
    exit 1;
}

{
    $started = 1;    # from here on, END stops what VAR_DIR/pids lists
    my $pid = spawn('run-gateway.sh start', "$dir/start.log", "$dir/start.log", \%GW_ENV,
                    'bash', $RUN_GATEWAY, 'start');
    my $st = finish_child($pid, 60);
    ok defined $st && $st == 0,
        "gateway started: WebDAV :$GW_PORT, metrics :$M_PORT, nodes @NODE_PORTS"
        or give_up('run-gateway.sh start failed');
}

my $http = HTTP::Tiny->new(timeout => 5);
my $json = JSON::PP->new;

sub status_json {
    my $r = $http->get("$M/status.json");
    return undef unless $r->{status} == 200;
    return eval { $json->decode($r->{content}) };
}

# ---- WebDAV traffic ---------------------------------------------------------------

# one request with curl; returns the HTTP status
sub curl {
    my ($method, $path, @args) = @_;
    my @cmd = ($CURL, '-sS', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '10',
               ($method eq 'HEAD' ? ('-I') : ('-X', $method)), @args, "$GW$path");
    my $pid = open(my $fh, '-|') // die "fork: $!";
    if (!$pid) { open STDERR, '>&', \*STDOUT; exec @cmd or POSIX::_exit(127) }
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return $? ? "curl failed: $out" : $out;
}

my (%sent, %status_sent);
sub req {
    my ($op, $want, $method, $path, @args) = @_;
    my $code = curl($method, $path, @args);
    $sent{$op}++;
    $status_sent{"$op,$code"}++;
    is $code, $want, "$method $path: $want";
}

spit("$dir/small", "shmprom t053\n" x 10);
spit("$dir/big", 'x' x 300_000);
req(mkdir => 201, 'MKCOL', '/t053/');
req(write => 201, 'PUT', '/t053/a.txt', '--data-binary', "\@$dir/small");
req(write => 201, 'PUT', '/t053/b.bin', '--data-binary', "\@$dir/big");
req(write => 204, 'PUT', '/t053/a.txt', '--data-binary', "\@$dir/small");
req(read  => 200, 'GET', '/t053/a.txt');
req(read  => 200, 'GET', '/t053/b.bin');
req(read  => 200, 'GET', '/t053/b.bin');
req(read  => 404, 'GET', '/t053/missing.txt');
req(stat  => 200, 'HEAD', '/t053/a.txt');
req(stat  => 207, 'PROPFIND', '/t053/a.txt', '-H', 'Depth: 0');
req(list  => 207, 'PROPFIND', '/t053/', '-H', 'Depth: 1');
req(list  => 207, 'PROPFIND', '/t053/', '-H', 'Depth: 1');

# the counters move in the log phase, after the client has its answer
my $st;
{
    my %got;
    my $ok = wait_until(sub {
        $st = status_json() or return 0;
        %got = map { $_ => $st->{ops}{$_}{requests} } keys %{ $st->{ops} // {} };
        return join(',', map { "$_=$got{$_}" } sort keys %got)
            eq join(',', map { "$_=$sent{$_}" } sort keys %sent);
    }, timeout => 10);
    ok $ok, '/status.json: requests per op == requests sent'
        or diag explain { sent => \%sent, got => \%got };
    is $st->{ops}{read}{by_status}{404}, 1, '/status.json: the 404 read is counted';
    is $st->{totals}{errors}, 0, '/status.json: no 5xx';
}
ok wait_until(sub { ($st = status_json()) && ($st->{nodes_up} // 0) == 3 }, timeout => 10),
    '/status.json: the 3 storage nodes are up'
    or diag explain $st->{nodes};
is_deeply [ sort keys %{ $st->{nodes} } ], [ sort map { "127.0.0.1:$_" } @NODE_PORTS ],
    '/status.json: the storage nodes by name';

# ---- connections: refreshed by /status.json itself --------------------------------

# No /metrics request from here on: only /status.json can update the gauge.
{
    my $IDLE = 4;
    my @idle = map {
        IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $M_PORT, Proto => 'tcp',
                              Timeout => 5) or die "connect :$M_PORT: $!"
    } 1 .. $IDLE;
    my $c;
    ok wait_until(sub {
        my $s = status_json() or return 0;
        $c = $s->{connections};
        return ($c->{waiting} // 0) >= $IDLE && ($c->{active} // 0) >= $IDLE + 1
            && ($c->{writing} // 0) >= 1;
    }, timeout => 10), "/status.json connections: $IDLE idle connections seen without a scrape"
        or diag explain $c;
    close $_ for @idle;
    ok wait_until(sub {
        my $s = status_json() or return 0;
        $c = $s->{connections};
        return defined $c->{waiting} && $c->{waiting} < $IDLE
            && ($c->{active} // $IDLE + 1) <= $IDLE;
    }, timeout => 10), '/status.json connections: and gone once closed'
        or diag explain $c;
}

# ---- the page in Chromium -----------------------------------------------------------

# Runs headless Chromium on the status page with @extra flags; returns its
# stdout. Fresh profile and HOME each time; no host name resolves.
my $runs = 0;
sub chromium {
    my (@extra) = @_;
    $runs++;
    my $profile = "$dir/chromium-profile-$runs";
    my $home = "$dir/chromium-home-$runs";
    make_path($profile, $home);
    my $t = time;
    my $pid = spawn("chromium #$runs", "$dir/chromium-$runs.out", "$dir/chromium-$runs.err",
                    { HOME => $home, XDG_CONFIG_HOME => "$home/.config",
                      XDG_CACHE_HOME => "$home/.cache" },
                    $CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                    '--no-first-run', '--disable-background-networking',
                    '--disable-component-update', '--disable-sync',
                    "--user-data-dir=$profile", '--no-proxy-server',
                    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
                    '--virtual-time-budget=5000', @extra, "$M/status");
    my $st = finish_child($pid, 30);
    my $ok = defined $st && $st == 0;
    ok $ok, sprintf('chromium %s: exits 0 (%.1fs)', "@extra", time - $t)
        or diag 'exit ' . ($st // 'killed') . "\n" . substr(slurp("$dir/chromium-$runs.err"), -3000);
    return slurp("$dir/chromium-$runs.out");
}

my %ENT = (amp => '&', lt => '<', gt => '>', quot => '"', '#39' => "'", apos => "'");
sub unescape { my ($s) = @_; $s =~ s/&(amp|lt|gt|quot|#39|apos);/$ENT{$1}/g; return $s }

# elements carrying data-k: [{ k, v, text, id }]
sub page_values {
    my ($dom) = @_;
    my @out;
    while ($dom =~ /<([a-z][a-z0-9]*)\b([^>]*\bdata-k="[^"]*"[^>]*)>([^<]*)</g) {
        my ($attrs, $text) = ($2, $3);
        my %a;
        $a{$1} = unescape($2) while $attrs =~ /\b([a-z][a-z0-9-]*)="([^"]*)"/g;
        push @out, { k => $a{'data-k'}, v => $a{'data-v'}, id => $a{id},
                     text => unescape($text) };
    }
    return @out;
}

# the JSON value at a data-k path; keys may contain dots (node names), so
# the longest key that exists wins at each level. Returns (found, value).
sub json_at {
    my ($o, @seg) = @_;
    return (1, $o) unless @seg;
    return (0) unless ref $o eq 'HASH';
    for my $n (reverse 1 .. @seg) {
        my $k = join '.', @seg[0 .. $n - 1];
        next unless exists $o->{$k};
        my @r = json_at($o->{$k}, @seg[$n .. $#seg]);
        return @r if $r[0];
    }
    return (0);
}

sub same_number {
    my ($page, $want) = @_;
    return !defined $want || ref $want ? $page eq '' : $page ne ''
        && $page =~ /^-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$/
        && abs($page - $want) <= 1e-12 * (1 + abs $want);
}

my $dom = chromium('--dump-dom');
my $after = status_json();
ok $after, '/status.json right after the page';
make_path($SHOT_DIR);
spit($DOM_COPY, $dom);

like $dom, qr/<body[^>]*\bdata-time="\d/, 'the page rendered the JSON (body data-time)';
like $dom, qr/<span id="state"[^>]*>updated /, 'the page shows no polling error'
    or diag $dom =~ /(<span id="state".{0,200})/s;

my @vals = page_values($dom);
my %by_k = map { $_->{k} => $_ } @vals;
ok @vals > 30, scalar(@vals) . ' numbers on the page (data-k)';

# rates need two successful polls: proof that the script polled at least twice
{
    my $r = $by_k{'rate.requests'} // {};
    like $r->{v} // '', qr/^\d/, 'operations/s shown: the page polled the JSON at least twice'
        or diag explain $r;
    my @rate_cells = grep { $_->{k} =~ /^rate\.ops\.\w+\.requests$/ } @vals;
    is scalar(grep { ($_->{v} // '') =~ /^\d/ } @rate_cells), scalar(keys %sent),
        'a rate for every op';
}

# every cumulative number equals the JSON; rates (rate.*) and the probe
# time of the last probe (changes every second) are not compared
my @required = ((map { "ops.$_.requests" } sort keys %sent),
                (map { "nodes.127.0.0.1:$_.up" } @NODE_PORTS),
                'nodes_up', 'totals.error_ratio', 'totals.in_flight',
                'ops.read.errors', 'ops.read.duration.p99', 'zone.bytes_used', 'zone.series',
                'zone.fill_ratio');
ok exists $by_k{$_}, "page shows $_" for @required;
{
    my ($compared, @bad) = (0);
    for my $e (@vals) {
        next if $e->{k} =~ /^rate\./ || $e->{k} =~ /\.probe_seconds$/;
        my ($found, $want) = json_at($after, split /\./, $e->{k});
        if (!$found) { push @bad, "$e->{k}: not in the JSON"; next }
        $compared++;
        push @bad, "$e->{k}: page " . ($e->{v} // 'no data-v') . ', JSON '
            . JSON::PP->new->canonical->allow_nonref->encode($want)
            unless defined $e->{v} && same_number($e->{v}, $want);
    }
    ok !@bad && $compared >= @required,
        "$compared cumulative numbers on the page == /status.json" or diag join "\n", @bad;
}

# what is printed matches too, for counts and node health
for my $op (sort keys %sent) {
    my $e = $by_k{"ops.$op.requests"} or next;
    (my $shown = $e->{text}) =~ tr/,//d;
    is $shown, $after->{ops}{$op}{requests}, "page prints $op requests = $sent{$op}";
}
for my $p (@NODE_PORTS) {
    my $e = $by_k{"nodes.127.0.0.1:$p.up"} or next;
    is $e->{text}, 'UP', "page prints node 127.0.0.1:$p UP";
}
is +($by_k{nodes_up} // {})->{text}, "3 / 3", 'page prints 3 / 3 nodes up';

# ---- screenshot -----------------------------------------------------------------

unlink $SHOT;
chromium("--screenshot=$SHOT", '--window-size=1280,1600');
{
    my $size = -s $SHOT // 0;
    ok $size > 20_000, "screenshot saved, $size bytes";
    my $png = slurp($SHOT);
    my ($w, $h) = length $png >= 24 && substr($png, 0, 8) eq "\x89PNG\r\n\x1a\n"
        ? unpack('NN', substr($png, 16, 8)) : (0, 0);
    is "${w}x$h", '1280x1600', 'a PNG of 1280x1600';
    diag "screenshot: $SHOT (DOM: $DOM_COPY)";
}

stop_gateway();
unlike join('', map { slurp($_) } glob("$VAR/logs/gateway.error.log")),
    qr/\[(?:alert|emerg|crit)\]|shmprom status:|status page:/,
    'no alert, and no error of the status page, in the gateway log';
diag sprintf 'took %.1fs', time - $T0;
done_testing;
