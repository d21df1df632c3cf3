package ShmpromTest;

# Test harness for shmprom: runs a real nginx (Debian nginx-core + lua module)
# in a throw-away prefix, drives it with a forking keep-alive load client and
# parses the Prometheus exposition. Core Perl only.
#
#   use lib 't/lib';
#   use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value);
#   my $n = ShmpromTest->new(workers => 2, http => '...', init => '...', server => '...');
#   $n->start;
#   my $r = $n->load(requests => 20000, concurrency => 8, path => '/x');
#   $n->stop;
#
# Environment: SHMPROM_KEEP=1 keeps the temp prefix; SHMPROM_NGINX and
# SHMPROM_NGINX_MODDIR override the nginx binary and module directory;
# SHMPROM_LUA_PATH / SHMPROM_EXTRA_HTTP are for testing the tests (see config_text).
#
# Config placeholders substituted everywhere in the generated nginx.conf:
#   $PORT, $PORT2 .. $PORTn (free loopback ports), $REPO (repository root),
#   $PREFIX (the temporary nginx prefix). Anything else ($host, ...) is left alone.

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(abs_path);
use Errno qw(EINTR ECONNRESET);
use Exporter qw(import);
use File::Basename qw(dirname);
use File::Path qw(remove_tree make_path);
use File::Spec;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Handle;
use IO::Select;
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Scalar::Util qw(weaken);
use Socket qw(SOL_SOCKET SO_RCVTIMEO SO_SNDTIMEO IPPROTO_TCP TCP_NODELAY);
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(wait_until parse_metrics metric_sum metric_value metric_series
                    escape_label_value format_series_key repo_root dechunk);

our $NGINX      = $ENV{SHMPROM_NGINX}       || '/usr/sbin/nginx';
our $MODULE_DIR = $ENV{SHMPROM_NGINX_MODDIR} || '/usr/lib/nginx/modules';

my $REPO = abs_path(File::Spec->catdir(dirname(abs_path(__FILE__)), '..', '..'));
sub repo_root { $REPO }

my %LIVE;    # refaddr => weak ref to every started instance, stopped in END

# A test ended by a signal still stops the nginx it started: Ctrl-C, a
# timeout's TERM, or SIGPIPE when its output is cut off (`prove ... | head`)
# would otherwise end the process before END runs and leave nginx behind.
# The handler exits instead, which runs END below (a forked child leaves at
# once, as the harness's children always do). Handlers a test sets itself
# are left alone.
my $LOADER_PID = $$;
for my $sig (qw(INT TERM HUP PIPE)) {
    next if ref $SIG{$sig} || ($SIG{$sig} // 'DEFAULT') ne 'DEFAULT';
    my $code = 128 + POSIX->can("SIG$sig")->();
    $SIG{$sig} = sub {
        POSIX::_exit($code) if $$ != $LOADER_PID;
        $SIG{PIPE} = 'IGNORE';    # END's own output may hit the closed pipe
        exit $code;
    };
}

# ---------------------------------------------------------------------------
# generic helpers

# wait_until(sub { ... }, timeout => 10, interval => 0.02, max_interval => 0.2)
# Polls the condition until it returns true or the deadline passes; returns
# the condition's last value (false on timeout). The poll interval grows
# geometrically from `interval` to `max_interval`.
sub wait_until {
    my ($cond, %o) = @_;
    my $timeout  = $o{timeout}      // 10;
    my $interval = $o{interval}     // 0.01;
    my $max      = $o{max_interval} // 0.2;
    my $deadline = time + $timeout;
    my $max_polls = 1_000_000;    # belt and braces: bounded in count too
    for (1 .. $max_polls) {
        my $v = $cond->();
        return $v if $v;
        my $left = $deadline - time;
        return $v if $left <= 0;
        sleep($interval < $left ? $interval : $left);
        $interval *= 1.5;
        $interval = $max if $interval > $max;
    }
    return;
}

sub _free_ports {
    my ($count) = @_;
    my (@socks, @ports, %seen);
    for my $try (1 .. $count * 20) {
        last if @ports == $count;
        my $s = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp', Listen => 1,
        ) or croak "cannot bind a loopback port: $!";
        my $p = $s->sockport;
        push @socks, $s;
        next if $seen{$p}++;
        push @ports, $p;
    }
    croak "could not find $count free ports" unless @ports == $count;
    close $_ for @socks;
    return @ports;
}

sub _slurp {
    my ($path) = @_;
    open my $fh, '<', $path or return undef;
    local $/;
    my $c = <$fh>;
    close $fh;
    return $c;
}

sub _spew {
    my ($path, $content) = @_;
    my $tmp = "$path.tmp.$$";
    open my $fh, '>', $tmp or croak "write $tmp: $!";
    print {$fh} $content or croak "write $tmp: $!";
    close $fh or croak "close $tmp: $!";
    rename $tmp, $path or croak "rename $tmp -> $path: $!";
}

# /proc/<pid>/stat: (ppid, state) or () if the pid does not exist
sub _proc_stat {
    my ($pid) = @_;
    my $s = _slurp("/proc/$pid/stat");
    return () unless defined $s;
    # comm may contain spaces and parentheses: split after the last ')'
    my $r = rindex($s, ')');
    return () if $r < 0;
    my @f = split ' ', substr($s, $r + 2);
    return ($f[1], $f[0]);    # ppid, state
}

sub _alive {
    my ($pid) = @_;
    return 0 unless $pid;
    my ($ppid, $state) = _proc_stat($pid);
    return 0 unless defined $state;
    return 0 if $state eq 'Z' || $state eq 'X';    # exited, not yet reaped
    return 1;
}

sub _cmdline {
    my ($pid) = @_;
    my $c = _slurp("/proc/$pid/cmdline");
    return '' unless defined $c;
    $c =~ tr/\0/ /;
    $c =~ s/\s+$//;
    return $c;
}

# children of $ppid as { pid => cmdline }, zombies excluded
sub _children {
    my ($ppid) = @_;
    my %kids;
    opendir my $dh, '/proc' or return {};
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        my ($pp, $state) = _proc_stat($pid);
        next unless defined $pp && $pp == $ppid;
        next if $state eq 'Z' || $state eq 'X';
        $kids{$pid} = _cmdline($pid);
    }
    closedir $dh;
    return \%kids;
}

# ---------------------------------------------------------------------------
# construction and config

# ShmpromTest->new(
#   workers     => 2,          # worker_processes
#   ports       => 1,          # how many free ports ($PORT, $PORT2, ...)
#   main        => '',         # extra main-context directives
#   events      => '',         # extra events-context directives
#   http        => '',         # extra http-context directives (lua_shared_dict, log_by_lua...)
#   init        => '',         # init_by_lua_block body (Lua)
#   init_worker => '',         # init_worker_by_lua_block body (Lua)
#   server      => '',         # body of the default server on $PORT (locations...)
#   listen      => '',         # extra flags for the default listen (e.g. 'reuseport')
#   servers     => '',         # further complete server { } blocks
#   no_default_server => 0,    # do not generate the default server
#   ready       => 'http',     # 'http': probe GET /__harness_ready (204) on the default server,
#                              # 'tcp': only connect to $PORT
#   access_log  => 0,          # 1: access_log $PREFIX/logs/access.log
#   error_level => 'info',
#   timeout     => 10,         # default deadline (s) for start/stop/reload waits
# )
sub new {
    my ($class, %o) = @_;
    my $self = bless {
        workers     => $o{workers} // 2,
        nports      => $o{ports} // 1,
        error_level => $o{error_level} // 'info',
        timeout     => $o{timeout} // 10,
        ready       => $o{ready} // 'http',
        access_log  => $o{access_log} // 0,
        parts       => {},
        master      => undef,
        pid_owner   => $$,
    }, $class;
    croak "ready must be 'http' or 'tcp'" unless $self->{ready} =~ /^(?:http|tcp)$/;

    my $base = $ENV{TMPDIR} && -d $ENV{TMPDIR} ? $ENV{TMPDIR} : '/tmp';
    $self->{prefix} = tempdir('shmprom-t-XXXXXX', DIR => $base, CLEANUP => 0);
    chmod 0755, $self->{prefix};
    for my $d (qw(logs conf tmp/body tmp/proxy tmp/fastcgi tmp/uwsgi tmp/scgi)) {
        make_path("$self->{prefix}/$d");
    }
    $self->{conf_path}  = "$self->{prefix}/conf/nginx.conf";
    $self->{pid_path}   = "$self->{prefix}/logs/nginx.pid";
    $self->{error_path} = "$self->{prefix}/logs/error.log";
    $self->{ports} = [ _free_ports($self->{nports}) ];

    $self->set_config(%o);
    return $self;
}

sub prefix     { $_[0]{prefix} }
sub conf_path  { $_[0]{conf_path} }
sub error_path { $_[0]{error_path} }
sub master_pid { $_[0]{master} }
sub workers    { $_[0]{workers} }
sub repo       { $REPO }

# $n->port      -> $PORT;  $n->port(2) -> $PORT2
sub port {
    my ($self, $i) = @_;
    $i //= 1;
    croak "port $i not allocated (ports => $self->{nports})" if $i < 1 || $i > $self->{nports};
    return $self->{ports}[$i - 1];
}

sub url {
    my ($self, $path, $port_index) = @_;
    return 'http://127.0.0.1:' . $self->port($port_index) . ($path // '/');
}

# substitute the harness placeholders in a piece of text
sub subst {
    my ($self, $text) = @_;
    return '' unless defined $text;
    $text =~ s/\$PORT(\d*)\b/$self->port($1 eq '' ? 1 : $1)/ge;
    $text =~ s/\$REPO\b/$REPO/g;
    $text =~ s/\$PREFIX\b/$self->{prefix}/g;
    return $text;
}

# set_config(%parts): replace some config parts (same keys as new) and rewrite
# nginx.conf; ports and prefix stay. Use before reload() to change definitions.
sub set_config {
    my ($self, %o) = @_;
    for my $k (qw(main events http init init_worker server listen servers no_default_server)) {
        $self->{parts}{$k} = $o{$k} if exists $o{$k};
    }
    if (exists $o{workers}) { $self->{workers} = $o{workers} }
    _spew($self->{conf_path}, $self->config_text);
    return $self;
}

sub config_text {
    my ($self) = @_;
    my $p = $self->{parts};
    my $user = $> == 0 ? "user root root;\n" : '';
    my $prefix = $self->{prefix};
    my $init = defined $p->{init} && length $p->{init}
        ? "    init_by_lua_block {\n$p->{init}\n    }\n" : '';
    my $initw = defined $p->{init_worker} && length $p->{init_worker}
        ? "    init_worker_by_lua_block {\n$p->{init_worker}\n    }\n" : '';
    my $access = $self->{access_log} ? "access_log $prefix/logs/access.log;" : 'access_log off;';
    # testing the tests: SHMPROM_LUA_PATH is prepended to lua_package_path
    # (e.g. a stand-in resty/shmprom.lua), SHMPROM_EXTRA_HTTP appended to http{}
    my $lua_path = $ENV{SHMPROM_LUA_PATH} // '';
    $lua_path .= ';' if length $lua_path && $lua_path !~ /;$/;
    my $listen_flags = defined $p->{listen} && length $p->{listen} ? " $p->{listen}" : '';
    my $server = $p->{no_default_server} ? '' : <<"EOS";
    server {
        listen 127.0.0.1:\$PORT$listen_flags;
        server_name localhost;
        location = /__harness_ready { return 204; }
@{[ $p->{server} // '' ]}
    }
EOS
    my $text = <<"EOC";
# generated by t/lib/ShmpromTest.pm
load_module $MODULE_DIR/ndk_http_module.so;
load_module $MODULE_DIR/ngx_http_lua_module.so;
${user}daemon on;
master_process on;
worker_processes $self->{workers};
pid $self->{pid_path};
error_log $self->{error_path} $self->{error_level};
worker_rlimit_nofile 4096;
@{[ $p->{main} // '' ]}

events {
    worker_connections 1024;
@{[ $p->{events} // '' ]}
}

http {
    $access
    client_body_temp_path $prefix/tmp/body;
    proxy_temp_path       $prefix/tmp/proxy;
    fastcgi_temp_path     $prefix/tmp/fastcgi;
    uwsgi_temp_path       $prefix/tmp/uwsgi;
    scgi_temp_path        $prefix/tmp/scgi;
    default_type text/plain;
    lua_package_path  "$lua_path\$REPO/lua/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_package_cpath "\$REPO/target/release/?.so;;";
@{[ $p->{http} // '' ]}
@{[ $ENV{SHMPROM_EXTRA_HTTP} // '' ]}
$init$initw$server@{[ $p->{servers} // '' ]}
}
EOC
    return $self->subst($text);
}

# ---------------------------------------------------------------------------
# process control

sub _run_nginx {
    my ($self, @args) = @_;
    my $out = "$self->{prefix}/logs/nginx-cmd.out";
    my $pid = fork // croak "fork: $!";
    if (!$pid) {
        open STDOUT, '>', $out;
        open STDERR, '>&', \*STDOUT;
        open STDIN, '<', '/dev/null';
        { no warnings q(exec); exec $NGINX, '-p', "$self->{prefix}/", '-e', $self->{error_path},
            '-c', $self->{conf_path}, @args; }
        POSIX::_exit(127);
    }
    # the nginx command itself returns quickly (daemon on); bounded wait anyway
    my $status;
    wait_until(sub { my $r = waitpid($pid, WNOHANG); $status = $? if $r == $pid; $r == $pid || $r < 0 },
               timeout => 60);
    if (!defined $status) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
        croak "nginx @args did not return within 60 s";
    }
    return ($status, _slurp($out) // '');
}

# nginx -t on the current config: (ok, output)
sub test_config {
    my ($self) = @_;
    my ($st, $out) = $self->_run_nginx('-t');
    return ($st == 0, $out);
}

sub _read_pid {
    my ($self) = @_;
    my $c = _slurp($self->{pid_path});
    return undef unless defined $c && $c =~ /^(\d+)\s*$/;
    return $1;
}

# SHMPROM_NO_PROCTITLE=1 (set by scripts/valgrind-check.sh): nginx's process
# titles are not visible in /proc (nginx runs under valgrind, whose command
# line /proc shows). Workers are then the master's children not yet retired
# by a reload of this harness; old workers the retired ones still running.
my $NO_TITLES = $ENV{SHMPROM_NO_PROCTITLE};

# pids of the current (not shutting down) worker processes, sorted
sub worker_pids {
    my ($self) = @_;
    return () unless $self->{master};
    my $kids = _children($self->{master});
    my @p = sort { $a <=> $b }
        grep { $NO_TITLES ? !$self->{retired}{$_} : $kids->{$_} =~ /worker process$/ } keys %$kids;
    return @p;
}

# pids of old workers still finishing after a reload
sub old_worker_pids {
    my ($self) = @_;
    return () unless $self->{master};
    my $kids = _children($self->{master});
    my @p = sort { $a <=> $b }
        grep { $NO_TITLES ? $self->{retired}{$_} : $kids->{$_} =~ /worker process is shutting down/ } keys %$kids;
    return @p;
}

# all children of the master (workers, old workers, helpers)
sub child_pids {
    my ($self) = @_;
    return () unless $self->{master};
    my @p = sort { $a <=> $b } keys %{ _children($self->{master}) };
    return @p;
}

sub is_running { my ($self) = @_; return $self->{master} && _alive($self->{master}) }

# true if a fresh connection to the default server gets an answer
sub ready {
    my ($self) = @_;
    if ($self->{ready} eq 'tcp' || $self->{parts}{no_default_server}) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->port,
                                      Proto => 'tcp', Timeout => 1);
        return 0 unless $s;
        close $s;
        return 1;
    }
    my $r = HTTP::Tiny->new(timeout => 2, keep_alive => 0)
        ->get($self->url('/__harness_ready'));
    return $r->{status} == 204;
}

sub _log_size { my ($self) = @_; return -s $self->{error_path} // 0 }

# error log lines at [emerg] appended since byte offset $mark
sub _emerg_since {
    my ($self, $mark) = @_;
    my @l = grep { /\[emerg\]/ } split /\n/, $self->error_log(since => $mark);
    return @l;
}

sub _tail {
    my ($self, $n) = @_;
    my @l = split /\n/, $self->error_log;
    @l = @l[-$n .. -1] if @l > $n;
    return join("\n", @l);
}

# start(timeout => 10): start nginx, wait until the master is up, the expected
# number of workers exist and the default server answers.
sub start {
    my ($self, %o) = @_;
    croak "already running (master $self->{master})" if $self->is_running;
    my $timeout = $o{timeout} // $self->{timeout};
    unlink $self->{pid_path};
    my $mark = $self->_log_size;
    my ($st, $out) = $self->_run_nginx();
    if ($st != 0) {
        croak "nginx failed to start (exit " . ($st >> 8) . "):\n$out\n--- error.log tail:\n"
            . $self->_tail(20);
    }
    my $master = wait_until(sub { my $p = $self->_read_pid; $p && _alive($p) ? $p : 0 },
                            timeout => $timeout)
        or croak "nginx master did not write $self->{pid_path}\n" . $self->_tail(20);
    $self->{master} = $master;
    $LIVE{"$self"} = $self;
    weaken($LIVE{"$self"});

    my $ok = wait_until(sub {
        return -1 if !_alive($master) || $self->_emerg_since($mark);
        return 0 unless $self->worker_pids == $self->{workers};
        return $self->ready;
    }, timeout => $timeout);
    if (!$ok || $ok == -1) {
        my $why = !_alive($master) ? 'master exited'
                : $ok ? 'emerg in error log'
                : 'timeout: ' . scalar($self->worker_pids) . " of $self->{workers} workers, ready="
                  . ($self->ready ? 1 : 0);
        my $tail = $self->_tail(30);
        $self->_kill_all;
        croak "nginx did not come up ($why)\n--- error.log tail:\n$tail";
    }
    return $self;
}

sub _kill_all {
    my ($self) = @_;
    my $m = $self->{master} or return;
    my @kids = $self->child_pids;
    kill 'KILL', $m if _alive($m);
    kill 'KILL', grep { _alive($_) } @kids;
    wait_until(sub { !_alive($m) && !grep { _alive($_) } @kids }, timeout => 5);
    $self->{master} = undef;
    delete $LIVE{"$self"};
}

# stop(signal => 'QUIT', timeout => 10): signal the master, wait until it and
# all its children have exited (escalates to TERM, then KILL, by pid).
# Returns true if the first signal was enough.
sub stop {
    my ($self, %o) = @_;
    my $m = $self->{master};
    return 1 unless $m;
    my $sig = $o{signal} // 'QUIT';
    my $timeout = $o{timeout} // $self->{timeout};
    my @kids = $self->child_pids;
    my $gone = sub { !_alive($m) && !grep { _alive($_) } @kids };
    kill $sig, $m;
    my $clean = wait_until($gone, timeout => $timeout);
    if (!$clean) {
        kill 'TERM', $m;
        if (!wait_until($gone, timeout => 5)) {
            $self->_kill_all;
        }
    }
    $self->{master} = undef;
    delete $LIVE{"$self"};
    return $clean ? 1 : 0;
}

# reload(timeout => 10, wait_old => 0): HUP the master and wait until the set
# of workers is a complete new set (disjoint from the old one) and a new
# connection is answered. With wait_old => 1 also wait until the old workers
# have exited. Dies (with the [emerg] lines) if nginx rejected the new config.
sub reload {
    my ($self, %o) = @_;
    my $m = $self->{master} or croak "not running";
    my $timeout = $o{timeout} // $self->{timeout};
    my %old = map { $_ => 1 } $self->worker_pids;
    $self->{retired}{$_} = 1 for keys %old;    # used without process titles only
    my $mark = $self->_log_size;
    kill 'HUP', $m or croak "kill HUP $m: $!";
    my $ok = wait_until(sub {
        return -1 if !_alive($m);
        return -2 if $self->_emerg_since($mark);
        my @w = $self->worker_pids;
        return 0 unless @w == $self->{workers};
        return 0 if grep { $old{$_} } @w;
        return $self->ready;
    }, timeout => $timeout);
    if (!$ok || $ok < 0) {
        my $why = !$ok ? 'timeout waiting for a new set of workers'
                : $ok == -1 ? 'master exited' : 'nginx rejected the new configuration';
        croak "reload failed ($why):\n" . join("\n", $self->_emerg_since($mark))
            . "\n--- error.log tail:\n" . $self->_tail(20);
    }
    if ($o{wait_old}) {
        $self->wait_old_workers_gone(timeout => $timeout)
            or croak "old workers still running after reload: " . join(' ', keys %old);
    }
    return $self;
}

sub wait_old_workers_gone {
    my ($self, %o) = @_;
    return wait_until(sub { !$self->old_worker_pids }, timeout => $o{timeout} // $self->{timeout});
}

# kill_worker($pid, 'KILL', timeout => 10): signal one worker, wait until it is
# gone and the master has brought the worker count back. Returns the new pids.
# hold($path, per_worker => 2): opens requests to $path, which must answer
# its worker's pid in the body (chunked), flush, then wait until the client
# goes away (`ngx.say(ngx.worker.pid()) ngx.flush(true) ngx.sleep(...)`
# with lua_check_client_abort), until every current worker holds at least
# per_worker of them (at most 60 connections). Returns
# ([ [socket, pid], ... ], { pid => count }); closing a socket ends its
# request.
sub hold {
    my ($self, $path, %o) = @_;
    my $per = $o{per_worker} // 2;
    my (@socks, %held);
    my %w = map { $_ => 1 } $self->worker_pids;
    for (1 .. 60) {
        last if !grep { ($held{$_} // 0) < $per } keys %w;
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->port, Proto => 'tcp',
                                      Timeout => 5)
            or last;
        print {$s} "GET $path HTTP/1.1\r\nHost: localhost\r\n\r\n";
        my $buf = '';
        my $deadline = time + 5;
        while ($buf !~ /\r\n\r\n[0-9a-f]+\r\n(\d+)\n/ && time < $deadline) {
            my $rin = '';
            vec($rin, fileno($s), 1) = 1;
            select(my $rout = $rin, undef, undef, 0.5) or next;
            sysread($s, $buf, 4096, length $buf) or last;
        }
        my ($pid) = $buf =~ /\r\n\r\n[0-9a-f]+\r\n(\d+)\n/ or next;
        push @socks, [ $s, $pid ];
        $held{$pid}++;
    }
    return (\@socks, \%held);
}

sub kill_worker {
    my ($self, $pid, $sig, %o) = @_;
    $sig //= 'KILL';
    my %cur = map { $_ => 1 } $self->worker_pids;
    croak "$pid is not a worker of master $self->{master}" unless $cur{$pid};
    kill $sig, $pid or croak "kill $sig $pid: $!";
    my $ok = wait_until(sub {
        return 0 if _alive($pid);
        my @w = $self->worker_pids;
        return 0 if grep { $_ == $pid } @w;
        return @w == $self->{workers};
    }, timeout => $o{timeout} // $self->{timeout});
    croak "worker $pid was not replaced:\n" . $self->_tail(10) unless $ok;
    return grep { !$cur{$_} } $self->worker_pids;
}

# ---------------------------------------------------------------------------
# error log

# error_log(since => $byte_offset): contents of the error log (from the offset)
sub error_log {
    my ($self, %o) = @_;
    my $c = _slurp($self->{error_path}) // '';
    my $since = $o{since} // 0;
    return $since >= length $c ? '' : substr($c, $since);
}

# mark: current error log size, to pass as since => later
sub log_mark { my ($self) = @_; return $self->_log_size }

# error_lines(since => $mark, ignore => qr/.../): lines at [error], [crit],
# [alert] or [emerg], optionally dropping those that match `ignore`.
sub error_lines {
    my ($self, %o) = @_;
    my @l = grep { /\[(?:error|crit|alert|emerg)\]/ } split /\n/, $self->error_log(%o);
    @l = grep { $_ !~ $o{ignore} } @l if $o{ignore};
    return @l;
}

# start_ok($what): start(), then a passing test "$what (workers PIDS)"; when
# nginx does not start, a failing "$what" with the reason, and the test file
# ends there (done_testing, exit): nothing after it could run.
sub start_ok {
    my ($self, $what) = @_;
    require Test::More;
    if (!eval { $self->start; 1 }) {
        my $err = $@;
        Test::More::fail($what);
        Test::More::diag($err);
        Test::More::done_testing();
        exit;
    }
    Test::More::pass("$what (workers " . join(' ', $self->worker_pids) . ')');
    return $self;
}

# ---------------------------------------------------------------------------
# simple requests

# metrics($path, $port_index) -> parse_metrics of GET $path (default
# /metrics on $PORT), or undef when it does not answer 200 or does not parse
sub metrics {
    my ($self, $path, $port_index) = @_;
    my $r = $self->get([ $path // '/metrics', $port_index // 1 ]);
    return undef unless $r->{status} == 200;
    return eval { parse_metrics($r->{body}) };
}

# get($path, %headers) -> { status, reason, headers => {lc name => value}, body, content }
# A path may be given as [$path, $port_index] to talk to $PORTn.
sub get {
    my ($self, $path, %h) = @_;
    return $self->request(GET => $path, headers => \%h);
}

# request($method, $path, headers => {}, content => $body, port => $index, timeout => 10)
# Uses HTTP::Tiny; a request with a Host header (which HTTP::Tiny refuses) is
# sent over a raw one-shot connection instead. Status 599 = no response.
sub request {
    my ($self, $method, $path, %o) = @_;
    my $port_index = $o{port} // 1;
    ($path, $port_index) = @$path if ref $path eq 'ARRAY';
    my %h = %{ $o{headers} || {} };
    my $r;
    if (grep { lc $_ eq 'host' } keys %h) {
        $r = _raw_request($self->port($port_index), $method, $path, \%h, $o{content}, $o{timeout} // 10);
    } else {
        my $http = HTTP::Tiny->new(timeout => $o{timeout} // 10, keep_alive => 0);
        $r = $http->request($method, $self->url($path, $port_index),
            { headers => \%h, (defined $o{content} ? (content => $o{content}) : ()) });
    }
    $r->{body} = $r->{content};
    return $r;
}

sub _raw_request {
    my ($port, $method, $path, $h, $content, $timeout) = @_;
    my $fail = sub { return { status => 599, reason => 'Internal Exception', headers => {},
                              content => "$_[0]\n", success => '' } };
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp',
                                  Timeout => $timeout) or return $fail->("connect: $!");
    my $tv = pack('l!l!', int($timeout), 0);
    setsockopt($s, SOL_SOCKET, SO_RCVTIMEO, $tv);
    $content //= '';
    my $req = "$method $path HTTP/1.1\r\nConnection: close\r\n";
    $req .= "$_: $h->{$_}\r\n" for sort keys %$h;
    $req .= "Content-Length: " . length($content) . "\r\n" if length $content;
    $req .= "\r\n$content";
    defined syswrite($s, $req) or return $fail->("write: $!");
    my $buf = '';
    for (1 .. 100_000) {
        my $r = sysread($s, $buf, 65536, length $buf);
        next if !defined $r && $! == EINTR;
        return $fail->("read: $!") unless defined $r;
        last if $r == 0;
    }
    close $s;
    my $he = index($buf, "\r\n\r\n");
    return $fail->('no header end') if $he < 0;
    my ($status_line, @lines) = split /\r\n/, substr($buf, 0, $he);
    my ($code, $reason) = $status_line =~ m{^HTTP/1\.[01] (\d{3}) ?(.*)$}
        or return $fail->("bad status line '$status_line'");
    my %hdr;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*)$/ or next;
        $k = lc $k;
        $hdr{$k} = exists $hdr{$k} ? (ref $hdr{$k} ? [ @{ $hdr{$k} }, $v ] : [ $hdr{$k}, $v ]) : $v;
    }
    my $body = substr($buf, $he + 4);
    $body = '' if $method eq 'HEAD';
    if (($hdr{'transfer-encoding'} // '') =~ /chunked/i) {
        $body = dechunk($body) // return $fail->('malformed chunked body');
    }
    return { status => $code, reason => $reason, headers => \%hdr, content => $body,
             success => $code =~ /^2/ ? 1 : '' };
}

# dechunk($body): the body of a chunked response, or undef when a chunk is
# short or not followed by CRLF (nginx sends no chunk extensions)
sub dechunk {
    my ($in) = @_;
    my $out = '';
    while ($in =~ s/\A([0-9a-fA-F]+)\r\n//) {
        my $len = hex $1;
        last if $len == 0;
        return undef if length($in) < $len + 2;
        $out .= substr($in, 0, $len, '');
        $in =~ s/\A\r\n// or return undef;
    }
    return $out;
}

# ---------------------------------------------------------------------------
# load client

# load(requests => 1000, concurrency => 4, path => '/', method => 'GET',
#      headers => {}, body => undef, port => 1, timeout => 120,
#      during => sub { my ($ctl) = @_; ... })
#
# Forks `concurrency` children, each with its own keep-alive HTTP/1.1
# connection (raw sockets), splitting the requests among them. A connection
# closed by the server before any byte of a response (keep-alive race, worker
# shutting down after a reload) is re-opened and the request re-sent, at most
# 5 times per request. Returns a hashref:
#   { ok => responses with status 200, status => { code => count },
#     errors => requests with no complete response, retries => re-sends,
#     connections => connections opened, requested => N, elapsed => seconds,
#     rate => responses/s, during_result => what `during` returned }
# `during` runs in the parent while the children load. $ctl->done is the number
# of responses received so far (approximate, reported every 100 per child),
# $ctl->wait_done($n, timeout => 30) waits until at least $n are done,
# $ctl->finished is true when every child has reported its final result.
sub load {
    my ($self, %o) = @_;
    my $n       = $o{requests} // 1000;
    my $conc    = $o{concurrency} // 4;
    my $path    = $o{path} // '/';
    my $method  = $o{method} // 'GET';
    my $timeout = $o{timeout} // 120;
    my $port    = $self->port($o{port} // 1);
    my $deadline = time + $timeout;
    $conc = $n if $conc > $n;
    $conc = 1 if $conc < 1;

    my $hdrs = "Host: " . ($o{host} // 'localhost') . "\r\n";
    for my $k (sort keys %{ $o{headers} || {} }) {
        $hdrs .= "$k: $o{headers}{$k}\r\n";
    }
    my $body = $o{body} // '';
    $hdrs .= "Content-Length: " . length($body) . "\r\n" if length $body || $method =~ /^(?:POST|PUT|PATCH)$/;
    my $req = "$method $path HTTP/1.1\r\n$hdrs\r\n$body";
    my $no_body = $method eq 'HEAD';

    my (@kids, %pipe_of);
    my $t0 = time;
    for my $i (0 .. $conc - 1) {
        my $share = int($n / $conc) + ($i < $n % $conc ? 1 : 0);
        pipe(my $r, my $w) or croak "pipe: $!";
        my $pid = fork;
        if (!defined $pid) {
            kill 'KILL', map { $_->{pid} } @kids;
            croak "fork: $!";
        }
        if (!$pid) {
            close $r;
            close $_->{fh} for @kids;
            my $code = 0;
            eval { _load_child($w, $port, $req, $share, $no_body, $deadline); 1 } or do {
                my $e = $@; $e =~ s/\n/ /g;
                syswrite $w, "X $e\n";
                $code = 1;
            };
            close $w;
            POSIX::_exit($code);    # no END blocks, no DESTROY of the parent's objects
        }
        close $w;
        push @kids, { pid => $pid, fh => $r, buf => '', done => 0, final => undef, eof => 0,
                      share => $share };
    }

    my $ctl = ShmpromTest::LoadCtl->new(\@kids, $deadline);
    my ($during_result, $during_err);
    if ($o{during}) {
        $during_result = eval { $o{during}->($ctl) };
        $during_err = $@ || undef;
    }
    # collect until every pipe is at EOF, bounded by the deadline (+ grace)
    wait_until(sub { $ctl->_poll(0.05); !grep { !$_->{eof} } @kids },
               timeout => $deadline + 5 - time, interval => 0, max_interval => 0);
    my $reaped = wait_until(sub {
        for my $k (@kids) { next if $k->{reaped}; $k->{reaped} = 1 if waitpid($k->{pid}, WNOHANG) != 0 }
        !grep { !$_->{reaped} } @kids;
    }, timeout => 5);
    if (!$reaped) {
        for my $k (grep { !$_->{reaped} } @kids) { kill 'KILL', $k->{pid}; waitpid($k->{pid}, 0) }
    }
    close $_->{fh} for @kids;
    my $elapsed = time - $t0;

    my %res = (ok => 0, status => {}, errors => 0, retries => 0, connections => 0,
               requested => $n, elapsed => $elapsed, child_errors => [],
               during_result => $during_result);
    for my $k (@kids) {
        if (!$k->{final}) {
            push @{ $res{child_errors} }, "child $k->{pid}: " . ($k->{xerr} // 'no result (deadline?)');
            $res{errors} += $k->{share};    # unknown outcome: count its whole share as failed
            next;
        }
        my %f = %{ $k->{final} };
        for my $code (keys %{ $f{status} }) { $res{status}{$code} += $f{status}{$code} }
        $res{$_} += $f{$_} for qw(errors retries connections);
        push @{ $res{child_errors} }, "child $k->{pid}: $k->{xerr}" if $k->{xerr};
        push @{ $res{child_errors} }, "child $k->{pid}: $f{last_error}" if $f{last_error};
    }
    $res{ok} = $res{status}{200} // 0;
    my $answered = 0; $answered += $_ for values %{ $res{status} };
    $res{answered} = $answered;
    $res{rate} = $elapsed > 0 ? $answered / $elapsed : 0;
    die $during_err if $during_err;
    return \%res;
}

sub _load_child {
    my ($w, $port, $req, $count, $no_body, $deadline) = @_;
    $SIG{PIPE} = 'IGNORE';
    my %status;
    my ($errors, $retries, $conns, $done, $last_error) = (0, 0, 0, 0, '');
    my $rcvtimeo = pack('l!l!', 10, 0);
    my ($sock, $used, $buf);

    my $connect = sub {
        close $sock if $sock;
        $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                      Proto => 'tcp', Timeout => 5);
        return 0 unless $sock;
        setsockopt($sock, SOL_SOCKET, SO_RCVTIMEO, $rcvtimeo);
        setsockopt($sock, SOL_SOCKET, SO_SNDTIMEO, $rcvtimeo);
        setsockopt($sock, IPPROTO_TCP, TCP_NODELAY, 1);
        $conns++;
        $used = 0;
        $buf = '';
        return 1;
    };

    # read more into $buf; returns bytes read, 0 on EOF, undef on error/timeout
    my $fill = sub {
        for (1 .. 100) {
            my $r = sysread($sock, $buf, 65536, length $buf);
            return $r if defined $r;
            next if $! == EINTR;
            return undef;
        }
        return undef;
    };

    my $progress_every = 100;
    REQUEST: for my $i (1 .. $count) {
        if (time > $deadline) { $last_error = 'deadline reached'; $errors += $count - $i + 1; last }
        my $attempts = 0;
        ATTEMPT: while (1) {
            $attempts++;
            if (!$sock) {
                if (!$connect->()) { $errors++; $last_error = "connect: $!"; undef $sock; next REQUEST }
            }
            my $reused = $used;
            my $wr = syswrite($sock, $req);
            if (!defined $wr || $wr != length $req) {
                my $e = "write: $!";
                undef $sock;
                if ($reused && $attempts <= 5) { $retries++; next ATTEMPT }
                $errors++; $last_error = $e; next REQUEST;
            }
            $used++;
            # headers
            my $hend;
            while (($hend = index($buf, "\r\n\r\n")) < 0) {
                my $r = $fill->();
                if (!$r) {
                    my $e = defined $r ? 'EOF before response' : "read: $!";
                    # keep-alive race: the server closed (EOF) or reset (unread
                    # request in its buffer) the idle connection before reading
                    # the request; no byte of a response means it was not served
                    my $retryable = $buf eq '' && $reused && (defined $r || $! == ECONNRESET);
                    undef $sock;
                    if ($retryable && $attempts <= 5) { $retries++; next ATTEMPT }
                    $errors++; $last_error = $e; next REQUEST;
                }
            }
            my $head = substr($buf, 0, $hend + 4, '');
            my ($code) = $head =~ m{^HTTP/1\.[01] (\d{3})};
            if (!$code) { $errors++; $last_error = 'bad status line'; undef $sock; next REQUEST }
            my $close = $head =~ /\r\nconnection:[ \t]*close/i || $head =~ m{^HTTP/1\.0};
            if ($no_body || $code == 204 || $code == 304 || $code < 200) {
                # no body
            } elsif ($head =~ /\r\ncontent-length:[ \t]*(\d+)/i) {
                my $len = $1;
                while (length $buf < $len) {
                    my $r = $fill->();
                    if (!$r) { $errors++; $last_error = 'short body'; undef $sock; next REQUEST }
                }
                substr($buf, 0, $len, '');
            } elsif ($head =~ /\r\ntransfer-encoding:[ \t]*chunked/i) {
                while (1) {
                    my $le;
                    while (($le = index($buf, "\r\n")) < 0) {
                        my $r = $fill->();
                        if (!$r) { $errors++; $last_error = 'short chunk'; undef $sock; next REQUEST }
                    }
                    my ($hex) = substr($buf, 0, $le) =~ /^([0-9a-fA-F]+)/;
                    if (!defined $hex) { $errors++; $last_error = 'bad chunk'; undef $sock; next REQUEST }
                    my $size = hex $hex;
                    if ($size == 0) {
                        # last chunk: optional trailers, then an empty line
                        my $te;
                        while (($te = index($buf, "\r\n\r\n", $le)) < 0) {
                            my $r = $fill->();
                            if (!$r) { $errors++; $last_error = 'short trailer'; undef $sock; next REQUEST }
                        }
                        substr($buf, 0, $te + 4, '');
                        last;
                    }
                    my $need = $le + 2 + $size + 2;
                    while (length $buf < $need) {
                        my $r = $fill->();
                        if (!$r) { $errors++; $last_error = 'short chunk data'; undef $sock; next REQUEST }
                    }
                    substr($buf, 0, $need, '');
                }
            } else {
                # body until close
                while (1) {
                    my $r = $fill->();
                    last if defined $r && $r == 0;
                    if (!defined $r) { $errors++; $last_error = 'read body: ' . $!; undef $sock; next REQUEST }
                }
                $buf = '';
                $close = 1;
            }
            $status{$code}++;
            $done++;
            undef $sock if $close;
            syswrite $w, "P $done\n" if $done % $progress_every == 0;
            last ATTEMPT;
        }
    }
    close $sock if $sock;
    my $st = join ',', map { "$_=$status{$_}" } sort keys %status;
    $last_error =~ s/[\r\n]/ /g;
    syswrite $w, "R done=$done errors=$errors retries=$retries connections=$conns status=$st last_error=$last_error\n";
}

package ShmpromTest::LoadCtl;

use Time::HiRes qw(time);

sub new { my ($c, $kids, $deadline) = @_; bless { kids => $kids, deadline => $deadline }, $c }

# read whatever the children have written; $wait seconds at most
sub _poll {
    my ($self, $wait) = @_;
    my $sel = IO::Select->new(map { $_->{fh} } grep { !$_->{eof} } @{ $self->{kids} });
    return unless $sel->count;
    for my $fh ($sel->can_read($wait)) {
        my ($k) = grep { $_->{fh} == $fh } @{ $self->{kids} };
        my $r = sysread($fh, $k->{buf}, 65536, length $k->{buf});
        if (!$r) { $k->{eof} = 1; next }
        while ($k->{buf} =~ s/^([^\n]*)\n//) {
            my $line = $1;
            if ($line =~ /^P (\d+)/) { $k->{done} = $1 }
            elsif ($line =~ /^X (.*)/) { $k->{xerr} = $1 }
            elsif ($line =~ /^R (.*)/) {
                my $rest = $1;
                my ($le) = $rest =~ s/ last_error=(.*)$// ? ($1) : ('');
                my %f = map { split /=/, $_, 2 } split ' ', $rest;
                my %st = map { split /=/, $_, 2 } grep { length } split /,/, ($f{status} // '');
                $k->{final} = { status => \%st, errors => $f{errors}, retries => $f{retries},
                                connections => $f{connections}, last_error => $le };
                $k->{done} = $f{done};
            }
        }
    }
}

sub done {
    my ($self) = @_;
    $self->_poll(0);
    my $t = 0;
    $t += $_->{done} for @{ $self->{kids} };
    return $t;
}

sub finished {
    my ($self) = @_;
    $self->_poll(0);
    return !grep { !$_->{final} && !$_->{eof} } @{ $self->{kids} };
}

# wait_done($n, timeout => 30): until at least $n responses are done (or all
# children finished); true if $n was reached
sub wait_done {
    my ($self, $n, %o) = @_;
    my $deadline = time + ($o{timeout} // 30);
    $deadline = $self->{deadline} if $deadline > $self->{deadline};
    for (1 .. 1_000_000) {
        $self->_poll(0.02);
        my $d = $self->done;
        return 1 if $d >= $n;
        return 0 if $self->finished || time > $deadline;
    }
    return 0;
}

package ShmpromTest;

# ---------------------------------------------------------------------------
# Prometheus text format (0.0.4; OpenMetrics 1.0 comments tolerated)

my $INF = 9**9**9;
my $NAN = $INF - $INF;

sub escape_label_value {
    my ($v) = @_;
    $v =~ s/\\/\\\\/g;
    $v =~ s/"/\\"/g;
    $v =~ s/\n/\\n/g;
    return $v;
}

# canonical key: name{a="x",b="y"} with labels sorted by name; "name" alone
# when there are no labels
sub format_series_key {
    my ($name, $labels) = @_;
    return $name unless $labels && %$labels;
    return $name . '{' . join(',', map { $_ . '="' . escape_label_value($labels->{$_}) . '"' }
                                    sort keys %$labels) . '}';
}

sub _parse_value {
    my ($s, $ln) = @_;
    return $INF  if $s =~ /^\+?Inf$/i;
    return -$INF if $s =~ /^-Inf$/i;
    return $NAN  if $s =~ /^NaN$/i;
    die "line $ln: bad sample value '$s'\n"
        unless $s =~ /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;
    return 0 + $s;
}

# parse_metrics($text) -> {
#   samples => { 'name{k="v",...}' => value },    # labels sorted, values escaped
#   list    => [ [ name, {labels}, value ], ... ],  # in input order, values unescaped
#   type    => { family => 'counter' | 'gauge' | 'histogram' | ... },
#   help    => { family => help text (unescaped) },
#   eof     => 1 if an OpenMetrics '# EOF' was seen,
# }
# Dies with "line N: ..." on malformed input or a duplicate series.
sub parse_metrics {
    my ($text) = @_;
    my %out = (samples => {}, list => [], type => {}, help => {}, eof => 0);
    my $ln = 0;
    my $name_re = qr/[a-zA-Z_:][a-zA-Z0-9_:]*/;
    for my $line (split /\n/, $text, -1) {
        $ln++;
        next if $line eq '';
        die "line $ln: content after # EOF\n" if $out{eof};
        if ($line =~ /^#/) {
            if ($line =~ /^# HELP ($name_re)(?: (.*))?$/) {
                my ($n, $h) = ($1, $2 // '');
                die "line $ln: second HELP for $n\n" if exists $out{help}{$n};
                $h =~ s/\\(.)/$1 eq 'n' ? "\n" : $1 eq '\\' ? '\\' : $1 eq '"' ? '"' : die "line $ln: bad escape \\$1 in HELP\n"/ge;
                $out{help}{$n} = $h;
            } elsif ($line =~ /^# TYPE ($name_re) (\S+)$/) {
                my ($n, $t) = ($1, $2);
                die "line $ln: second TYPE for $n\n" if exists $out{type}{$n};
                die "line $ln: unknown type $t\n"
                    unless $t =~ /^(?:counter|gauge|histogram|summary|untyped|unknown|gaugehistogram|stateset|info)$/;
                $out{type}{$n} = $t;
            } elsif ($line eq '# EOF') {
                $out{eof} = 1;
            } elsif ($line =~ /^# (?:HELP|TYPE)\b/) {
                die "line $ln: malformed '$line'\n";
            }
            next;    # other comments (# UNIT ...) are allowed
        }
        $line =~ /^($name_re)/g or die "line $ln: bad metric name in '$line'\n";
        my $name = $1;
        my %labels;
        if ($line =~ /\G\{/gc) {
            while (1) {
                $line =~ /\G\s*/gc;
                last if $line =~ /\G\}/gc;
                $line =~ /\G([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*/gc
                    or die "line $ln: bad label in '$line'\n";
                my ($k, $v) = ($1, $2);
                die "line $ln: duplicate label $k\n" if exists $labels{$k};
                $v =~ s/\\(.)/$1 eq 'n' ? "\n" : $1 eq '\\' ? '\\' : $1 eq '"' ? '"' : die "line $ln: bad escape \\$1 in label value\n"/ge;
                $labels{$k} = $v;
                next if $line =~ /\G,/gc;
                $line =~ /\G\}/gc or die "line $ln: expected , or } in '$line'\n";
                last;
            }
        }
        $line =~ /\G[ \t]+(\S+)(?:[ \t]+(-?\d+(?:\.\d+)?))?[ \t]*$/gc
            or die "line $ln: bad sample line '$line'\n";
        my $value = _parse_value($1, $ln);
        my $key = format_series_key($name, \%labels);
        die "line $ln: duplicate series $key\n" if exists $out{samples}{$key};
        $out{samples}{$key} = $value;
        push @{ $out{list} }, [ $name, \%labels, $value ];
    }
    return \%out;
}

# samples of metric $name whose labels include all of %filter: list of [ {labels}, value ]
sub metric_series {
    my ($parsed, $name, %filter) = @_;
    my @r;
    S: for my $s (@{ $parsed->{list} }) {
        next unless $s->[0] eq $name;
        for my $k (keys %filter) {
            next S unless defined $s->[1]{$k} && $s->[1]{$k} eq $filter{$k};
        }
        push @r, [ $s->[1], $s->[2] ];
    }
    return @r;
}

# sum of the values of metric $name over the series matching %filter (0 if none)
sub metric_sum {
    my ($parsed, $name, %filter) = @_;
    my $t = 0;
    $t += $_->[1] for metric_series($parsed, $name, %filter);
    return $t;
}

# value of the series with exactly these labels, undef if absent
sub metric_value {
    my ($parsed, $name, %labels) = @_;
    return $parsed->{samples}{ format_series_key($name, \%labels) };
}

# ---------------------------------------------------------------------------
# cleanup

sub cleanup {
    my ($self) = @_;
    $self->stop(signal => 'TERM', timeout => 5) if $self->{master};
    return if $ENV{SHMPROM_KEEP};
    remove_tree($self->{prefix}) if $self->{prefix} && -d $self->{prefix} && !$self->{removed}++;
}

sub DESTROY {
    my ($self) = @_;
    return if $self->{pid_owner} != $$;    # a forked child never stops nginx
    local ($?, $@, $!);
    $self->cleanup;
}

END {
    local $?;
    for my $k (keys %LIVE) {
        my $o = $LIVE{$k} or next;
        next if $o->{pid_owner} != $$;
        $o->cleanup;
    }
}

1;
