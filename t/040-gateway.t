#!/usr/bin/perl
# The file-system gateway preset (lua/resty/shmprom/gateway.lua) on its
# embedded default (scripts/run-gateway.sh start: the gateway nginx in front of
# three storage nodes, nginx dav + dav_ext over one data directory), driven by
# real clients on free loopback ports:
#
#   1. rclone copies a tree of files (0 B .. 5 MiB, in subdirectories) into
#      the gateway, lists it, copies it back (sha256 equal), moves one file
#      and deletes some; the metrics show exactly the writes, reads, renames
#      and deletes made, the object sizes, and the bytes and per-node attempts
#      that the gateway's access log records;
#   2. curl: PROPFIND Depth 0/1, MKCOL, MOVE, COPY, LOCK/UNLOCK, HEAD,
#      OPTIONS, PROPPATCH and an unknown method land in their op and status;
#   3. a storage node stopped during an rclone copy: the copy succeeds, the
#      failed attempts and retries are counted against that node, its node_up
#      goes to 0 and back to 1 after start-node;
#   4. /metrics is not served on the gateway port; the metrics port serves
#      text 0.0.4 that promtool accepts;
#   5. the in-flight gauge counts a request being served and returns to 0;
#      a request nginx rejects while reading its header (400) is counted
#      in requests_total but was never in flight (the gauge stays at 0, not
#      -1), and the gateway's error log has no word from the preset.
#
# Expected numbers come from what the test itself did (files and sizes it
# generated, the status each curl request got) and, where rclone's request
# pattern is its own business (PROPFINDs, MKCOLs, retries), from the gateway's
# access log (VAR_DIR/logs/gateway.access.log, format "dfs_gateway" in
# nginx-conf/gateway.conf). The log is parsed and classified here, without the
# preset's code.
#
# Everything it starts is stopped at the end, also on failure:
# `run-gateway.sh stop` with the same environment (it stops the nginx masters
# listed in VAR_DIR/pids), and the clients by their pids.
# SHMPROM_KEEP=1 keeps the temporary directory (VAR_DIR with the logs).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA;
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Socket qw(SOL_SOCKET SO_RCVTIMEO);
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value repo_root);

my $t_start = time;
my $REPO = repo_root();
my $LIB = "$REPO/target/release/libshmprom.so";
my $RUN = "$REPO/scripts/run-gateway.sh";
my $MODDIR = '/usr/lib/nginx/modules';

sub which {
    my ($prog) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$prog" if -x "$d/$prog";
    }
    return;
}

plan skip_all => "$LIB not built (make build)" unless -f $LIB;
for my $m (qw(ndk_http_module ngx_http_lua_module ngx_http_dav_ext_module)) {
    plan skip_all => "$MODDIR/$m.so missing (make deps)" unless -f "$MODDIR/$m.so";
}
my $MODULE_SO = "$REPO/target/release/ngx_http_shmprom_module.so";
plan skip_all => "$MODULE_SO not built (make build)" if $ENV{SHMPROM_T040_RECORDER}
    && $ENV{SHMPROM_T040_RECORDER} eq 'module' && !-f $MODULE_SO;
my $RCLONE = which('rclone') or plan skip_all => 'rclone not installed (make deps)';
my $CURL = which('curl') or plan skip_all => 'curl not installed (make deps)';
my $PROMTOOL = which('promtool') or plan skip_all => 'promtool not installed (make deps)';

# ---------------------------------------------------------------- set-up

my $DIR = tempdir('shmprom-t040-XXXXXX', TMPDIR => 1, CLEANUP => !$ENV{SHMPROM_KEEP});
chmod 0755, $DIR;
diag "keeping $DIR" if $ENV{SHMPROM_KEEP};
make_path("$DIR/out", "$DIR/var");

# five distinct free loopback ports, all held until all are chosen
my @PORTS = do {
    my @s = map {
        IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0,
                              Proto => 'tcp', ReuseAddr => 1) or die "no free port: $!"
    } 1 .. 5;
    my @p = map { $_->sockport } @s;
    close $_ for @s;
    @p;
};
my ($GW_PORT, $M_PORT, @NODE_PORTS) = @PORTS;
# who records the gateway's requests: the preset's Lua phase handlers here,
# ngx_http_shmprom_module in t/041-gateway-module.t (which runs this file)
my $RECORDER = $ENV{SHMPROM_T040_RECORDER} // 'lua';
my %GW_ENV = (
    RECORDER => $RECORDER,
    GATEWAY_PORT => $GW_PORT, METRICS_PORT => $M_PORT,
    NODE_PORTS => "@NODE_PORTS", VAR_DIR => "$DIR/var",
    START_TIMEOUT => 15, STOP_TIMEOUT => 10,
);
my $ACCESS_LOG = "$DIR/var/logs/gateway.access.log";
my $ERROR_LOG = "$DIR/var/logs/gateway.error.log";
my $GW = "http://127.0.0.1:$GW_PORT";
my $METRICS_URL = "http://127.0.0.1:$M_PORT/metrics";

# rclone: no config of its own (an empty file, never the user's), on-the-fly
# remote; strict: one try per request, so a failure the gateway did not hide
# fails the command
my $RCLONE_CONF = "$DIR/rclone.conf";
{ open my $f, '>', $RCLONE_CONF or die "$RCLONE_CONF: $!"; close $f }
my %RCLONE_ENV = (RCLONE_CONFIG => $RCLONE_CONF, RCLONE_CACHE_DIR => "$DIR/rclone-cache",
                  XDG_CACHE_HOME => "$DIR/rclone-cache");
my $REMOTE = ":webdav,url='$GW',vendor=other:";
my @RCLONE_OPTS = qw(--retries 1 --low-level-retries 1 --contimeout 5s --timeout 30s
                     --multi-thread-streams 0 -v);

# ---------------------------------------------------------------- processes

my %CHILD;    # pid => name, children started and not yet reaped
my $n_out = 0;

# spawn($name, \%env, @cmd) -> (pid, stdout file, stderr file): stdin
# /dev/null, stdout and stderr to files under $DIR/out
sub spawn {
    my ($name, $env, @cmd) = @_;
    my $out = sprintf '%s/out/%02d-%s', $DIR, ++$n_out, $name;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', "$out.out" or POSIX::_exit(126);
        open STDERR, '>', "$out.err" or POSIX::_exit(126);
        @ENV{ keys %$env } = values %$env;
        exec { $cmd[0] } @cmd or POSIX::_exit(127);
    }
    $CHILD{$pid} = $name;
    return ($pid, "$out.out", "$out.err");
}

# reap($pid, $timeout) -> exit status ($?), or undef when it had to be
# killed (TERM, then KILL) after $timeout seconds
sub reap {
    my ($pid, $timeout) = @_;
    my $st;
    my $done = wait_until(sub {
        my $r = waitpid($pid, WNOHANG);
        $st = $? if $r == $pid;
        return $r == $pid || $r == -1;
    }, timeout => $timeout, interval => 0.005, max_interval => 0.05);
    if (!$done) {
        diag "$CHILD{$pid} (pid $pid) still runs after ${timeout}s: stopping it";
        kill 'TERM', $pid;
        wait_until(sub { my $r = waitpid($pid, WNOHANG); $r == $pid || $r == -1 },
                   timeout => 5, interval => 0.01)
            or do { kill 'KILL', $pid; waitpid($pid, 0) };
        $st = undef;
    }
    delete $CHILD{$pid};
    return $st;
}

sub slurp { my ($f) = @_; open my $fh, '<', $f or return ''; local $/; return scalar <$fh> }

# run($timeout, $name, \%env, @cmd) -> (exit status or undef, stdout, stderr)
sub run {
    my ($timeout, $name, $env, @cmd) = @_;
    my ($pid, $out, $err) = spawn($name, $env, @cmd);
    my $st = reap($pid, $timeout);
    return ($st, slurp($out), slurp($err));
}

sub gateway_cmd {
    my ($timeout, @args) = @_;
    return run($timeout, "run-gateway-$args[0]", \%GW_ENV, 'bash', $RUN, @args);
}

sub rclone {
    my ($name, @args) = @_;
    return run(60, "rclone-$name", \%RCLONE_ENV, $RCLONE, @RCLONE_OPTS, @args);
}

my $stopped = 0;
sub stop_everything {
    return if $stopped++;
    for my $pid (keys %CHILD) {    # clients still running (a failure midway)
        kill 'TERM', $pid;
        reap($pid, 5);
    }
    if (-f "$DIR/var/pids") {
        my ($st, $out, $err) = gateway_cmd(40, 'stop');
        diag "run-gateway.sh stop failed: $out$err" unless defined $st && $st == 0;
    }
}
END { local $?; stop_everything() }
$SIG{INT} = $SIG{TERM} = sub { stop_everything(); exit 1 };

# ---------------------------------------------------------------- metrics

my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);

sub scrape {
    my $r = $http->get($METRICS_URL);
    die "GET $METRICS_URL: $r->{status} $r->{content}\n" unless $r->{status} == 200;
    return parse_metrics($r->{content});
}

# the series of $name as { "v1 v2" => value }, keyed by the values of @labels
sub by_labels {
    my ($p, $name, @labels) = @_;
    my %h;
    for my $s (@{ $p->{list} }) {
        next unless $s->[0] eq $name;
        $h{ join ' ', map { $s->[1]{$_} // '?' } @labels } += $s->[2];
    }
    return \%h;
}

# ---------------------------------------------------------------- access log

my %OP = (GET => 'read', HEAD => 'stat', PUT => 'write', DELETE => 'delete',
          MKCOL => 'mkdir', MOVE => 'rename', COPY => 'copy', LOCK => 'lock',
          UNLOCK => 'lock', PROPPATCH => 'meta', OPTIONS => 'meta');

sub op_of {
    my ($method, $depth) = @_;
    return $OP{$method} if $OP{$method};
    return $depth eq '0' ? 'stat' : 'list' if $method eq 'PROPFIND';
    return 'other';
}

# complete lines of the access log as hashes; format "dfs_gateway":
#   $remote_addr [$time_local] "$request" $status $request_length $bytes_sent
#   $request_time depth=$http_depth up=$upstream_addr
#   ustatus=$upstream_status utime=$upstream_response_time
sub read_log {
    my $text = slurp($ACCESS_LOG);
    $text =~ s/[^\n]*\z//;    # a line being written
    my @l;
    for my $line (split /\n/, $text) {
        $line =~ m{^\S+ \[[^\]]*\] "(\S+) (\S+)[^"]*" (\d{3}) (\d+) (\d+) \S+ depth=(\S*) up=(.*) ustatus=(.*) utime=(.*)$}
            or die "access log: cannot parse '$line'\n";
        push @l, { method => $1, path => $2, status => $3, received => $4, sent => $5,
                   depth => $6, up => $7, ustatus => $8, utime => $9,
                   op => op_of($1, $6) };
    }
    return @l;
}

# the attempts of one log line: [node, status, time, retried]; entries at the
# same position of the three lists belong together, ", " separates attempts
# and " : " internal redirects (a new group: no retry across it)
sub attempts_of {
    my ($l) = @_;
    return () if $l->{up} eq '-';
    my @ga = split / : /, $l->{up};
    my @gs = split / : /, $l->{ustatus};
    my @gt = split / : /, $l->{utime};
    my @r;
    for my $g (0 .. $#ga) {
        my @a = split /, /, $ga[$g];
        my @s = split /, /, $gs[$g] // '';
        my @t = split /, /, $gt[$g] // '';
        push @r, [ $a[$_], $s[$_] // '-', $t[$_] // '-', $_ < $#a ? 1 : 0 ] for 0 .. $#a;
    }
    return @r;
}

# what the metrics must say about these log lines
sub log_model {
    my %m = (requests => {}, count => {}, received => {}, sent => {}, attempts => {},
             failures => {}, retries => {}, updur => {}, proxied => 0, n_attempts => 0);
    for my $l (@_) {
        $m{requests}{"$l->{op} $l->{status}"}++;
        $m{count}{ $l->{op} }++;
        $m{received}{ $l->{op} } += $l->{received};
        $m{sent}{ $l->{op} } += $l->{sent};
        my @a = attempts_of($l) or next;
        $m{proxied}++;
        for my $a (@a) {
            my ($node, $st, $t, $retried) = @$a;
            $m{n_attempts}++;
            $m{attempts}{"$node $st"}++;
            $m{failures}{$node}++ if $st eq '-' || $st =~ /^5/;
            $m{retries}{$node}++ if $retried;
            $m{updur}{$node}++ if $t =~ /^\d+(?:\.\d+)?$/;
        }
    }
    return \%m;
}

# the same from a scrape
sub metrics_model {
    my ($p) = @_;
    my $P = 'dfs_gateway_';
    my %m = (
        requests => by_labels($p, "${P}requests_total", qw(op status)),
        count    => by_labels($p, "${P}request_duration_seconds_count", 'op'),
        received => by_labels($p, "${P}received_bytes_total", 'op'),
        sent     => by_labels($p, "${P}sent_bytes_total", 'op'),
        attempts => by_labels($p, "${P}upstream_attempts_total", qw(node status)),
        failures => by_labels($p, "${P}upstream_failures_total", 'node'),
        retries  => by_labels($p, "${P}upstream_retries_total", 'node'),
        updur    => by_labels($p, "${P}upstream_duration_seconds_count", 'node'),
    );
    # series that exist at 0 (none expected, but they would say nothing)
    for my $k (keys %m) { delete $m{$k}{$_} for grep { $m{$k}{$_} == 0 } keys %{ $m{$k} } }
    $m{n_attempts} = metric_sum($p, "${P}upstream_attempts_total");
    $m{proxied} = $m{n_attempts} - metric_sum($p, "${P}upstream_retries_total");
    return \%m;
}

# waits until every request in the access log is counted and none is in
# flight; returns (scrape, log lines)
sub settle {
    my ($what) = @_;
    my ($p, @l);
    my $ok = wait_until(sub {
        @l = read_log();
        $p = scrape();
        return metric_sum($p, 'dfs_gateway_requests_total') == @l
            && (metric_value($p, 'dfs_gateway_requests_in_flight') // -1) == 0;
    }, timeout => 10);
    ok($ok, "$what: the metrics count the " . scalar(@l) . " logged requests, none in flight")
        or diag 'requests_total sum ' . metric_sum($p, 'dfs_gateway_requests_total')
              . ', in flight ' . (metric_value($p, 'dfs_gateway_requests_in_flight') // 'none');
    return ($p, @l);
}

# every per-request and per-node family equals what the access log says
sub check_against_log {
    my ($what, $p, @l) = @_;
    my $want = log_model(@l);
    my $got = metrics_model($p);
    for my $k (qw(requests count received sent attempts failures retries updur)) {
        is_deeply($got->{$k}, $want->{$k}, "$what: $k by label equals the access log")
            or diag explain { metrics => $got->{$k}, log => $want->{$k} };
    }
    is($got->{n_attempts}, $want->{n_attempts}, "$what: attempts equal the log's upstream entries");
    is($got->{proxied}, $want->{proxied},
       "$what: attempts - retries = requests proxied ($want->{proxied})");
}

# difference of two model hashes (after - before), zero entries dropped
sub delta {
    my ($after, $before) = @_;
    my %d;
    for my $k (keys %$after) {
        my $v = $after->{$k} - ($before->{$k} // 0);
        $d{$k} = $v if $v;
    }
    return \%d;
}

sub hist {    # (count, sum) of a histogram series
    my ($p, $name, %l) = @_;
    return (metric_value($p, "${name}_count", %l) // 0, metric_value($p, "${name}_sum", %l) // 0);
}

# ---------------------------------------------------------------- local files

sub write_file {
    my ($path, $bytes) = @_;
    open my $f, '>:raw', $path or die "$path: $!";
    print {$f} $bytes;
    close $f or die "$path: $!";
}

sub random_bytes {
    my ($n) = @_;
    return '' unless $n;
    open my $r, '<:raw', '/dev/urandom' or die "/dev/urandom: $!";
    my $got = read($r, my $buf, $n);
    die "short read from /dev/urandom" unless defined $got && $got == $n;
    return $buf;
}

sub sha256_file { return Digest::SHA->new(256)->addfile($_[0], 'b')->hexdigest }

# ---------------------------------------------------------------- the map

# gateway.log() parses $dfs_gateway_log field by field: the map in
# nginx-conf/gateway.conf must be exactly gateway.LOG_MAP (the Lua string,
# written as a concatenation of literals in gateway.lua)
{
    my $lua = slurp("$REPO/lua/resty/shmprom/gateway.lua");
    my ($expr) = $lua =~ /^_M\.LOG_MAP = (.*?)\n\n/ms;
    my $want = join '', ($expr // '') =~ /"([^"]*)"/g;
    my ($conf_map) = slurp("$REPO/nginx-conf/gateway.conf")
        =~ /map "" \$dfs_gateway_log \{\s*default "([^"]*)";/;
    ok(length $want, 'gateway.LOG_MAP found in gateway.lua');
    is($conf_map, $want, 'the $dfs_gateway_log map in nginx-conf/gateway.conf is gateway.LOG_MAP');
    my @readme = slurp("$REPO/README.md") =~ /\$dfs_gateway_log \{\s*default "([^"]*)";/g;
    ok(@readme >= 1, 'README.md shows the $dfs_gateway_log map');
    is_deeply(\@readme, [ ($want) x @readme ], 'every $dfs_gateway_log map in README.md is gateway.LOG_MAP');
}

# ---------------------------------------------------------------- start

{
    my ($st, $out, $err) = gateway_cmd(60, 'start');
    if (!defined $st || $st != 0) {
        diag "$out$err";
        BAIL_OUT('run-gateway.sh start failed');
    }
    pass("run-gateway.sh start: gateway $GW_PORT, metrics $M_PORT, nodes @NODE_PORTS");
    # the recorder this run is about is the one nginx runs
    my $conf = join "\n", grep { !/^\s*#/ } split /\n/, slurp("$DIR/var/conf/gateway.conf");
    if ($RECORDER eq 'module') {
        ok($conf =~ /^\s*load_module \S*ngx_http_shmprom_module\.so;/m
           && $conf =~ /^\s*shmprom_gateway on;/m && $conf !~ /log_by_lua/,
           'the module records (load_module, shmprom_gateway on, no Lua phase handlers)');
    } else {
        ok($conf !~ /shmprom_gateway|ngx_http_shmprom_module/ && $conf =~ /log_by_lua_block \{ gateway\.log\(\) \}/,
           'the Lua phase handlers record (no module)');
    }
}

# the totals the object size histogram must reach: bytes of the bodies the
# clients of this test wrote and read
my %objects = (write_n => 0, write_bytes => 0, read_n => 0, read_bytes => 0);

# ---------------------------------------------------------------- 1. rclone

subtest 'rclone: copy a tree in, list, read back, move, delete' => sub {
    my $src = "$DIR/src";
    my %files = (    # relative path => size
        'empty.bin' => 0, 'one.bin' => 1, 'small.txt' => 3000,
        'docs/page.html' => 4096 + 17, 'docs/notes/n.txt' => 12_345,
        'media/one-mib.bin' => 1 << 20, 'media/raw/five-mib.bin' => 5 * (1 << 20) + 3,
    );
    my @files = sort keys %files;
    my $total = 0;
    for my $f (@files) {
        (my $d = "$src/$f") =~ s{/[^/]*$}{};
        make_path($d);
        write_file("$src/$f", random_bytes($files{$f}));
        $total += $files{$f};
    }

    # -- upload
    my ($p0, @l0) = settle('before the upload');
    my ($st, $out, $err) = rclone('copy', 'copy', $src, "${REMOTE}tree");
    is($st, 0, 'rclone copy into the gateway succeeds') or diag "$out$err";
    my ($p1, @l1) = settle('after the upload');
    my @w = @l1[@l0 .. $#l1];
    my @puts = grep { $_->{method} eq 'PUT' } @w;
    is_deeply([sort map { $_->{path} } @puts], [sort map { "/tree/$_" } @files],
              'rclone made one PUT per file (access log)');
    is(scalar(grep { $_->{status} =~ /^2/ } @puts), scalar @files, 'every PUT got a 2xx');
    my $d = delta(by_labels($p1, 'dfs_gateway_requests_total', 'op'),
                  by_labels($p0, 'dfs_gateway_requests_total', 'op'));
    is($d->{write}, scalar @files, 'write count == files uploaded');
    my %wst = map { $_ => 1 } map { (split / /)[1] }
              grep { /^write / } keys %{ delta(by_labels($p1, 'dfs_gateway_requests_total', qw(op status)),
                                               by_labels($p0, 'dfs_gateway_requests_total', qw(op status))) };
    ok(!grep({ !/^2/ } keys %wst), 'writes counted with 2xx statuses only: ' . join(',', sort keys %wst));
    my ($c0, $s0) = hist($p0, 'dfs_gateway_object_size_bytes', op => 'write');
    my ($c1, $s1) = hist($p1, 'dfs_gateway_object_size_bytes', op => 'write');
    is($c1 - $c0, scalar @files, 'object_size{op="write"} _count == files uploaded');
    is($s1 - $s0, $total, "object_size{op=\"write\"} _sum == bytes uploaded ($total)");
    $objects{write_n} += @files;
    $objects{write_bytes} += $total;
    my ($r0) = delta(by_labels($p1, 'dfs_gateway_received_bytes_total', 'op'),
                     by_labels($p0, 'dfs_gateway_received_bytes_total', 'op'));
    cmp_ok($r0->{write}, '>', $total, 'received_bytes{op="write"} covers the bodies and headers');
    check_against_log('upload', $p1, @l1);

    # -- list
    ($st, $out, $err) = rclone('lsf', 'lsf', '-R', "${REMOTE}tree");
    is($st, 0, 'rclone lsf -R succeeds') or diag "$out$err";
    my %dirs;    # every directory above a file
    for my $f (@files) {
        my $x = $f;
        $dirs{$x} = 1 while $x =~ s{/[^/]*$}{};
    }
    my @listed = sort grep { length } split /\n/, $out;
    is_deeply(\@listed, [sort(@files, map { "$_/" } keys %dirs)], 'the listing shows the tree');
    my ($p2, @l2) = settle('after the listing');
    my @lw = @l2[@l1 .. $#l2];
    ok(@lw && !grep({ $_->{method} ne 'PROPFIND' } @lw), 'the listing is PROPFINDs only ('
       . scalar(@lw) . ')');
    is(delta(by_labels($p2, 'dfs_gateway_requests_total', 'op'),
             by_labels($p1, 'dfs_gateway_requests_total', 'op'))->{list},
       scalar(grep { $_->{depth} ne '0' } @lw), 'list count == Depth 1 PROPFINDs made');

    # -- read back
    my $back = "$DIR/back";
    ($st, $out, $err) = rclone('copy-back', 'copy', "${REMOTE}tree", $back);
    is($st, 0, 'rclone copy back succeeds') or diag "$out$err";
    is_deeply({ map { $_ => sha256_file("$back/$_") } grep { -f "$back/$_" } @files },
              { map { $_ => sha256_file("$src/$_") } @files }, 'every file reads back equal (sha256)');
    my ($p3, @l3) = settle('after the read back');
    my @gets = grep { $_->{method} eq 'GET' } @l3[@l2 .. $#l3];
    is_deeply([sort map { $_->{path} } @gets], [sort map { "/tree/$_" } @files],
              'rclone made one GET per file (access log)');
    my $read_bytes = 0;
    for my $g (@gets) {    # what arrived on this side
        (my $f = $g->{path}) =~ s{^/tree/}{};
        $read_bytes += -s "$back/$f" // 0;
    }
    $d = delta(by_labels($p3, 'dfs_gateway_requests_total', qw(op status)),
               by_labels($p2, 'dfs_gateway_requests_total', qw(op status)));
    is_deeply({ map { $_ => $d->{$_} } grep { /^read / } keys %$d },
              { 'read 200' => scalar @gets }, 'read count == reads made, all 200');
    ($c0, $s0) = hist($p2, 'dfs_gateway_object_size_bytes', op => 'read');
    ($c1, $s1) = hist($p3, 'dfs_gateway_object_size_bytes', op => 'read');
    is($c1 - $c0, scalar @gets, 'object_size{op="read"} _count == reads made');
    is($s1 - $s0, $read_bytes, "object_size{op=\"read\"} _sum == bytes downloaded ($read_bytes)");
    is($read_bytes, $total, 'bytes downloaded == bytes uploaded');
    $objects{read_n} += @gets;
    $objects{read_bytes} += $read_bytes;
    my $sent = delta(by_labels($p3, 'dfs_gateway_sent_bytes_total', 'op'),
                     by_labels($p2, 'dfs_gateway_sent_bytes_total', 'op'));
    cmp_ok($sent->{read}, '>', $read_bytes, 'sent_bytes{op="read"} covers the bodies and headers');

    # -- move one file
    ($st, $out, $err) = rclone('moveto', 'moveto', "${REMOTE}tree/one.bin", "${REMOTE}tree/moved/one-renamed.bin");
    is($st, 0, 'rclone moveto succeeds') or diag "$out$err";
    my ($p4, @l4) = settle('after the move');
    my @moves = grep { $_->{method} eq 'MOVE' } @l4[@l3 .. $#l4];
    is(scalar @moves, 1, 'rclone made one MOVE (server-side)');
    $d = delta(by_labels($p4, 'dfs_gateway_requests_total', qw(op status)),
               by_labels($p3, 'dfs_gateway_requests_total', qw(op status)));
    is_deeply({ map { $_ => $d->{$_} } grep { /^rename / } keys %$d },
              { map { ("rename $_->{status}" => 1) } @moves }, 'rename count == 1, with its status');
    like($moves[0]{status} // '', qr/^2/, 'the MOVE succeeded');

    # -- delete: one file, a directory (purge), the files of a directory
    my @del_cmds = (['deletefile', "${REMOTE}tree/empty.bin"],
                    ['purge', "${REMOTE}tree/media/raw"],
                    ['delete', "${REMOTE}tree/docs"]);
    for my $c (@del_cmds) {
        ($st, $out, $err) = rclone($c->[0], @$c);
        is($st, 0, "rclone $c->[0] succeeds") or diag "$out$err";
    }
    my ($p5, @l5) = settle('after the deletes');
    my @dels = grep { $_->{method} eq 'DELETE' } @l5[@l4 .. $#l5];
    cmp_ok(scalar @dels, '>=', 1 + 1 + 2, 'rclone made the DELETEs asked for');
    $d = delta(by_labels($p5, 'dfs_gateway_requests_total', qw(op status)),
               by_labels($p4, 'dfs_gateway_requests_total', qw(op status)));
    my %want_del;
    $want_del{"delete $_->{status}"}++ for @dels;
    is_deeply({ map { $_ => $d->{$_} } grep { /^delete / } keys %$d }, \%want_del,
              'delete count == DELETEs made (' . scalar(@dels) . '), by status');
    ($st, $out, $err) = rclone('lsf-after', 'lsf', '-R', '--files-only', "${REMOTE}tree");
    is_deeply([sort grep { length } split /\n/, $out],
              [sort 'small.txt', 'media/one-mib.bin', 'moved/one-renamed.bin'],
              'what is left is what should be');
    check_against_log('rclone session', $p5, @l5);
    my ($wc, $ws) = hist($p5, 'dfs_gateway_object_size_bytes', op => 'write');
    my ($rc, $rs) = hist($p5, 'dfs_gateway_object_size_bytes', op => 'read');
    is_deeply([$wc, $ws, $rc, $rs], [@objects{qw(write_n write_bytes read_n read_bytes)}],
              'object size totals == bodies written and read so far');
};

# ---------------------------------------------------------------- 2. curl

subtest 'curl: every WebDAV method lands in its op with its status' => sub {
    my ($p0, @l0) = settle('before the curl requests');
    my $lockinfo = '<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:">'
                 . '<D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype>'
                 . '</D:lockinfo>';
    my $proppatch = '<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:">'
                  . '<D:set><D:prop><D:displayname>x</D:displayname></D:prop></D:set>'
                  . '</D:propertyupdate>';
    my $body = "hello, gateway\n" x 10;
    write_file("$DIR/body.txt", $body);
    my %headers_of;    # request name => response headers
    my @req = (    # [name, op, success pattern, curl args...]
        ['PUT',            'write',  qr/^20[14]$/, '-T', "$DIR/body.txt", "$GW/c/a.txt"],
        ['MKCOL',          'mkdir',  qr/^201$/,    '-X', 'MKCOL', "$GW/c/dir/"],
        ['PROPFIND 0',     'stat',   qr/^207$/,    '-X', 'PROPFIND', '-H', 'Depth: 0', "$GW/c/"],
        ['PROPFIND 1',     'list',   qr/^207$/,    '-X', 'PROPFIND', '-H', 'Depth: 1', "$GW/c/"],
        ['PROPFIND',       'list',   qr/^207$/,    '-X', 'PROPFIND', "$GW/c/a.txt"],
        ['HEAD',           'stat',   qr/^200$/,    '--head', "$GW/c/a.txt"],
        ['COPY',           'copy',   qr/^20[14]$/, '-X', 'COPY', '-H', "Destination: $GW/c/b.txt", "$GW/c/a.txt"],
        ['MOVE',           'rename', qr/^20[14]$/, '-X', 'MOVE', '-H', "Destination: $GW/c/dir/b.txt", "$GW/c/b.txt"],
        ['LOCK',           'lock',   qr/^20[01]$/,    '-X', 'LOCK', '-H', 'Timeout: Second-30',
                                                    '-H', 'Content-Type: application/xml',
                                                    '--data-binary', $lockinfo, "$GW/c/locked.txt"],
        ['UNLOCK',         'lock',   qr/^204$/,    '-X', 'UNLOCK', '-H', 'Lock-Token: @LOCK@', "$GW/c/locked.txt"],
        ['OPTIONS',        'meta',   qr/^200$/,    '-X', 'OPTIONS', "$GW/c/"],
        ['PROPPATCH',      'meta',   qr/^\d{3}$/,  '-X', 'PROPPATCH', '-H', 'Content-Type: application/xml',
                                                    '--data-binary', $proppatch, "$GW/c/a.txt"],
        ['unknown method', 'other',  qr/^\d{3}$/,  '-X', 'FROBNICATE', "$GW/c/a.txt"],
    );
    my %want;
    for my $r (@req) {
        my ($name, $op, $ok_re, @args) = @$r;
        if (grep { /\@LOCK\@/ } @args) {
            my ($tok) = ($headers_of{LOCK} // '') =~ /^Lock-Token:\s*(\S+)/mi;
            ok($tok, 'LOCK answered with a Lock-Token');
            $tok //= '<none>';
            s/\@LOCK\@/$tok/ for @args;
        }
        my $hdr = "$DIR/out/curl-headers.txt";
        unlink $hdr;
        my ($st, $code) = run(20, 'curl', {}, $CURL, '-s', '--max-time', '10', '-o', '/dev/null',
                              '-D', $hdr, '-w', '%{http_code}', @args);
        $headers_of{$name} = slurp($hdr);
        is($st, 0, "curl $name ran");
        like($code, $ok_re, "$name answered $code");
        $want{"$op $code"}++;
        if ($name eq 'PUT' && $code =~ /^2/) {
            $objects{write_n}++;
            $objects{write_bytes} += length $body;
        }
    }
    my ($p1, @l1) = settle('after the curl requests');
    my @w = @l1[@l0 .. $#l1];
    is(scalar @w, scalar @req, 'one gateway request per curl request');
    my $d = delta(by_labels($p1, 'dfs_gateway_requests_total', qw(op status)),
                  by_labels($p0, 'dfs_gateway_requests_total', qw(op status)));
    is_deeply($d, \%want, 'requests_total grew by exactly one per request, in its op and status')
        or diag explain { got => $d, want => \%want };
    check_against_log('curl', $p1, @l1);
};

# ---------------------------------------------------------------- 3. node stop

subtest 'a storage node stopped during a copy' => sub {
    my $victim = $NODE_PORTS[1];
    my $node = "127.0.0.1:$victim";
    my $src = "$DIR/src3";
    make_path($src);
    my $n = 16;
    my %size;
    for my $i (1 .. $n) {
        $size{"f$i.bin"} = 1000 * $i + 7;
        write_file("$src/f$i.bin", random_bytes($size{"f$i.bin"}));
    }
    my ($p0, @l0) = settle('before the copy');
    is(metric_value($p0, 'dfs_gateway_node_up', node => $node), 1, "$node is up before");

    # a copy slow enough (--tpslimit) that the node stops in its middle
    my ($pid, $out, $err) = spawn('rclone-copy-node-stop', \%RCLONE_ENV, $RCLONE, @RCLONE_OPTS,
                                  '--tpslimit', '20', 'copy', $src, "${REMOTE}t3");
    my $copy_st;
    my $reaped = sub {
        return 1 if defined $copy_st;
        return 0 unless waitpid($pid, WNOHANG) == $pid;
        $copy_st = $?;
        delete $CHILD{$pid};
        return 1;
    };
    ok(wait_until(sub {
        return 1 if $reaped->();
        my @l = read_log();
        return grep({ $_->{method} eq 'PUT' } @l[@l0 .. $#l]) >= 3;
    }, timeout => 20), 'the copy is under way (3 PUTs logged)');
    ok(!$reaped->(), 'the copy still runs when the node stops');
    my ($st, $sout, $serr) = gateway_cmd(30, 'stop-node', $victim);
    is($st, 0, "run-gateway.sh stop-node $victim") or diag "$sout$serr";
    $copy_st = reap($pid, 60) unless $reaped->();
    is($copy_st, 0, 'the copy succeeds through the other nodes') or diag slurp($out) . slurp($err);

    ($st, $sout, $serr) = rclone('check-t3', 'check', '--download', $src, "${REMOTE}t3");
    is($st, 0, 'rclone check --download: every file arrived intact') or diag "$sout$serr";

    my ($p1, @l1) = settle('after the copy');
    my @w = @l1[@l0 .. $#l1];
    my $wm = log_model(@w);
    cmp_ok($wm->{failures}{$node} // 0, '>=', 1, "the log shows failed attempts to $node");
    my $dfail = delta(by_labels($p1, 'dfs_gateway_upstream_failures_total', 'node'),
                      by_labels($p0, 'dfs_gateway_upstream_failures_total', 'node'));
    my $dretry = delta(by_labels($p1, 'dfs_gateway_upstream_retries_total', 'node'),
                       by_labels($p0, 'dfs_gateway_upstream_retries_total', 'node'));
    is_deeply($dfail, $wm->{failures}, "failures_total{node=\"$node\"} grew by the failed attempts");
    is_deeply($dretry, $wm->{retries}, "retries_total{node=\"$node\"} grew by the retried attempts");
    is_deeply([keys %$dfail], [$node], 'only the stopped node failed');
    cmp_ok($dretry->{$node} // 0, '>=', 1, 'the gateway retried on another node');
    ok(!grep({ $_->{status} !~ /^[234]/ } @w), 'no client saw a 5xx');
    for my $g (grep { $_->{method} eq 'GET' && $_->{status} == 200 } @w) {
        (my $f = $g->{path}) =~ s{^/t3/}{};
        $objects{read_n}++;
        $objects{read_bytes} += $size{$f} // 0;
    }
    for my $put (grep { $_->{method} eq 'PUT' && $_->{status} =~ /^2/ } @w) {
        (my $f = $put->{path}) =~ s{^/t3/}{};
        $objects{write_n}++;
        $objects{write_bytes} += $size{$f} // 0;
    }
    check_against_log('node stopped', $p1, @l1);

    my $p;
    ok(wait_until(sub { $p = scrape(); (metric_value($p, 'dfs_gateway_node_up', node => $node) // -1) == 0 },
                  timeout => 10), "node_up{node=\"$node\"} drops to 0");
    is(metric_value($p, 'dfs_gateway_node_up', node => "127.0.0.1:$_"), 1, "127.0.0.1:$_ stays up")
        for grep { $_ != $victim } @NODE_PORTS;

    ($st, $sout, $serr) = gateway_cmd(30, 'start-node', $victim);
    is($st, 0, "run-gateway.sh start-node $victim") or diag "$sout$serr";
    ok(wait_until(sub { $p = scrape(); (metric_value($p, 'dfs_gateway_node_up', node => $node) // -1) == 1 },
                  timeout => 10), "node_up{node=\"$node\"} returns to 1");
};

# ---------------------------------------------------------------- 4. exposure

subtest '/metrics only on the metrics port, text 0.0.4, promtool' => sub {
    for my $path ('/metrics', '/status', '/nginx_status') {
        my $r = $http->get("$GW$path");
        ok($r->{status} != 200 || $r->{content} !~ /dfs_gateway_|shmprom_|Active connections/,
           "GET $path on the gateway port is not served by the gateway ($r->{status})");
        unlike($r->{content} // '', qr/^# (?:HELP|TYPE) /m, "GET $path on the gateway port: no exposition");
    }
    my $r = $http->get($METRICS_URL);
    is($r->{status}, 200, 'GET /metrics on the metrics port');
    is($r->{headers}{'content-type'}, 'text/plain; version=0.0.4; charset=utf-8',
       'Content-Type is Prometheus text 0.0.4');
    write_file("$DIR/metrics.txt", $r->{content});
    my ($st, $out, $err) = run(30, 'promtool', {}, 'sh', '-c', 'exec "$0" check metrics < "$1"',
                         $PROMTOOL, "$DIR/metrics.txt");
    is($st, 0, 'promtool check metrics passes') or diag "$out$err";
    my $p = parse_metrics($r->{content});
    for my $f (qw(requests_total request_duration_seconds received_bytes_total sent_bytes_total
                  object_size_bytes requests_in_flight upstream_attempts_total
                  upstream_failures_total upstream_retries_total upstream_duration_seconds
                  node_up node_probe_duration_seconds connections)) {
        ok($p->{type}{"dfs_gateway_$f"}, "family dfs_gateway_$f is exposed");
    }
    ok(defined metric_value($p, 'shmprom_zone_bytes', type => 'capacity'), 'self-metrics are exposed');
    is(metric_sum($p, 'shmprom_series_dropped_total'), 0, 'no series dropped');
};

# ---------------------------------------------------------------- 5. in flight

subtest 'requests in flight' => sub {
    settle('before');
    # a PUT whose body is held back is in flight (server rewrite phase done,
    # the body not read yet); one completed, one abandoned by its client
    for my $end ('complete', 'abandon') {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $GW_PORT, Proto => 'tcp',
                                      Timeout => 5) or die "connect: $!";
        $s->autoflush(1);
        setsockopt($s, SOL_SOCKET, SO_RCVTIMEO, pack('l!l!', 10, 0));
        print {$s} "PUT /c/held-$end.txt HTTP/1.1\r\nHost: 127.0.0.1:$GW_PORT\r\n"
                 . "Content-Length: 10\r\nConnection: close\r\n\r\n12345";
        my $p;
        ok(wait_until(sub { $p = scrape(); (metric_value($p, 'dfs_gateway_requests_in_flight') // 0) == 1 },
                      timeout => 10), "in flight is 1 while a request is being served ($end)");
        if ($end eq 'complete') {
            print {$s} '67890';
            local $/;
            my $resp = <$s> // '';
            like($resp, qr{^HTTP/1\.1 20[14] }, 'the held PUT completes');
            if ($resp =~ /^HTTP\/1\.1 2/) {
                $objects{write_n}++;
                $objects{write_bytes} += 10;
            }
        }
        close $s;
    }
    # HTTP/1.1 without Host: rejected with 400 while nginx reads the header,
    # before the server rewrite phase (begin() never runs); the log phase
    # runs and must not take it out of flight
    my ($p0) = settle('before a rejected request');
    my $bad_before = metric_value($p0, 'dfs_gateway_requests_total', op => 'read', status => '400') // 0;
    {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $GW_PORT, Proto => 'tcp',
                                      Timeout => 5) or die "connect: $!";
        $s->autoflush(1);
        setsockopt($s, SOL_SOCKET, SO_RCVTIMEO, pack('l!l!', 10, 0));
        print {$s} "GET /c/no-host.txt HTTP/1.1\r\nConnection: close\r\n\r\n";
        local $/;
        my $resp = <$s> // '';
        like($resp, qr{^HTTP/1\.1 400 }, 'a request without Host is rejected with 400');
        close $s;
    }
    my ($p, @l) = settle('after all traffic');
    is((metric_value($p, 'dfs_gateway_requests_total', op => 'read', status => '400') // 0) - $bad_before, 1,
       'the rejected request is counted in requests_total');
    is(metric_value($p, 'dfs_gateway_requests_in_flight'), 0, 'in flight returns to 0');
    my @said = grep { /resty\.shmprom\.gateway|uninitialized/ } split /\n/, slurp($ERROR_LOG);
    is(scalar(@said), 0, 'the error log has no line from the preset and no uninitialized variable')
        or diag join "\n", @said[0 .. ($#said < 4 ? $#said : 4)];
    check_against_log('whole run', $p, @l);
    my ($wc, $ws) = hist($p, 'dfs_gateway_object_size_bytes', op => 'write');
    my ($rc, $rs) = hist($p, 'dfs_gateway_object_size_bytes', op => 'read');
    is_deeply([$wc, $ws, $rc, $rs], [@objects{qw(write_n write_bytes read_n read_bytes)}],
              'object size totals == bodies written and read by this test');
    is(metric_sum($p, 'shmprom_errors_total'), 0, 'no shmprom errors');
};

# ---------------------------------------------------------------- stop

# the nginx masters now (VAR_DIR/pids: "NAME PID" lines), to check the stop
my @MASTERS = map { /^\S+\s+(\d+)\s*$/ ? $1 : () } split /\n/, slurp("$DIR/var/pids");
stop_everything();
{
    my @left = grep { my $st = slurp("/proc/$_/stat"); $st =~ /\)\s+[^ZX]/ } @MASTERS;
    ok(!-f "$DIR/var/pids" && @MASTERS == 4 && !@left,
       'run-gateway.sh stop stopped the ' . scalar(@MASTERS) . ' nginx masters it started')
        or diag "still running: @left";
}
my $elapsed = time - $t_start;
cmp_ok($elapsed, '<', 60, sprintf('ran in %.1f s', $elapsed));
done_testing;
