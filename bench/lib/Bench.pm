package Bench;

# Shared helpers of the shmprom benchmarks (bench/*.pl): throw-away nginx
# instances on free loopback ports, wrk runs, worker CPU time from /proc,
# medians and markdown. Core Perl only.
#
# Benchmarks are not tests: nothing here asserts a timing. Every process a
# benchmark starts is recorded by pid and stopped by that pid (TERM, then
# KILL after a bound) when the benchmark ends, dies or is interrupted.
#
# Environment (set by bench/run-all.sh):
#   BENCH_WORK   scratch directory (nginx prefixes, logs, raw outputs)
#   BENCH_OUT    where each benchmark writes its markdown fragment
#   QUICK=1      short runs (debugging, ~2 minutes for everything)
#   PEER_LUA_PATH  a checkout of nginx-lua-prometheus to run side by side

use strict;
use warnings;

use Cwd qw(abs_path);
use Exporter qw(import);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(:sys_wait_h setsid);
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(
    $REPO $WORK $OUT $QUICK $PEER $NGINX $MODULES $USER_LINE
    free_ports nginx_start nginx_stop worker_pids cpu_ticks clk_tck conf_head shmprom_module
    wrk_run http_get http_get_json wait_until median minmax fmt_num
    md_table write_fragment slurp spew spawn_child stop_child wait_child json_encode
    add_target stall_locations wait_for_conns
    lua_paths logmsg
);

our $REPO = abs_path(dirname(abs_path(__FILE__)) . '/../..');
our $QUICK = $ENV{QUICK} ? 1 : 0;
our $PEER = $ENV{PEER_LUA_PATH} || '';
our $NGINX = $ENV{NGINX} || '/usr/sbin/nginx';
our $MODULES = '/usr/lib/nginx/modules';
# A scratch directory of its own when run alone; none under `perl -c` ($^C:
# a syntax check runs this but not the END block that would remove it)
our $WORK = $ENV{BENCH_WORK}
    || ($^C ? '/nonexistent/shmprom-bench' : tempdir('shmprom-bench.XXXXXX', TMPDIR => 1, CLEANUP => 1));
our $OUT = $ENV{BENCH_OUT} || "$WORK/out";
make_path($WORK, $OUT) unless $^C;
# workers must be able to write their prefix when we run as root
our $USER_LINE = $> == 0 ? 'user root root;' : '';

my %STARTED;    # pid => { name, kind } for every process we started

sub logmsg { print STDERR "[bench] @_\n" }

sub slurp {
    my ($p) = @_;
    open my $fh, '<', $p or return undef;
    local $/;
    my $c = <$fh>;
    close $fh;
    return $c;
}

sub spew {
    my ($p, $c) = @_;
    open my $fh, '>', $p or die "write $p: $!\n";
    print {$fh} $c;
    close $fh or die "close $p: $!\n";
}

sub json_encode { JSON::PP->new->canonical->pretty->encode($_[0]) }

sub wait_until {
    my ($cond, $timeout, $interval) = @_;
    $interval ||= 0.02;
    my $deadline = time + $timeout;
    for (1 .. 1_000_000) {
        my $v = $cond->();
        return $v if $v;
        return undef if time >= $deadline;
        sleep $interval;
    }
    return undef;
}

# free_ports(N): N distinct free loopback ports
sub free_ports {
    my ($n) = @_;
    my (@s, %seen, @p);
    for (1 .. $n * 20) {
        last if @p == $n;
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                      Proto => 'tcp', Listen => 1)
            or die "cannot bind a loopback port: $!\n";
        push @s, $s;
        push @p, $s->sockport unless $seen{ $s->sockport }++;
    }
    close $_ for @s;
    die "no $n free ports\n" unless @p == $n;
    return @p;
}

# lua_package_path / cpath lines for the repo (and the peer when given)
# (the snapshot of run-all.sh when there is one: BENCH_SNAP/lua, /lib)
sub lua_paths {
    my $peer = $PEER ? "$PEER/?.lua;" : '';
    my $snap = $ENV{BENCH_SNAP};
    my $lua = $snap ? "$snap/lua" : "$REPO/lua";
    my $lib = $snap ? "$snap/lib" : "$REPO/target/release";
    return "lua_package_path \"$lua/?.lua;$REPO/bench/lua/?.lua;${peer}"
         . "/usr/share/lua/5.1/?.lua;;\";\n"
         . "    lua_package_cpath \"$lib/?.so;;\";";
}

# ngx_http_shmprom_module: the copy taken at the start of the run (with the
# library's), else the build's.
sub shmprom_module {
    my $snap = $ENV{BENCH_SNAP};
    return $snap ? "$snap/lib/ngx_http_shmprom_module.so"
                 : "$REPO/target/release/ngx_http_shmprom_module.so";
}

# The start of every bench's nginx.conf, up to and inside `http {`: the ndk
# and lua modules (and those of modules => [paths] after them), the user line (when root), the workers, pid and error log
# under $PREFIX (nginx_start fills it in), the events block, the Lua paths
# and `access_log off`; temp => 1 adds every temp path under $PREFIX.
#   conf_head(workers => 2, conns => 1024, log => 'notice', temp => 0, modules => [])
sub conf_head {
    my (%o) = @_;
    my $extra = join '', map { "load_module $_;\n" } @{ $o{modules} || [] };
    my $workers = $o{workers} // 2;
    my $conns = $o{conns} // 1024;
    my $log = $o{log} // 'notice';
    my $paths = lua_paths();
    my $temp = '';
    if ($o{temp}) {
        for my $t (qw(client_body proxy fastcgi uwsgi scgi)) {
            my $dir = $t eq 'client_body' ? 'body' : $t;
            $temp .= "    ${t}_temp_path \$PREFIX/tmp/$dir;\n";
        }
    }
    return <<"EOC";
load_module $MODULES/ndk_http_module.so;
load_module $MODULES/ngx_http_lua_module.so;
$extra$USER_LINE
worker_processes $workers;
pid \$PREFIX/logs/nginx.pid;
error_log \$PREFIX/logs/error.log $log;
events { worker_connections $conns; }
http {
    $paths
    access_log off;
$temp
EOC
}

# The stall detector's two locations (bench/lua/shmprom_bench/stall.lua):
# /stall/reset starts a new measuring window in every worker, /stall/read
# answers the longest gaps per worker as JSON. The conf also needs
# `lua_shared_dict stall 1m;` and, in init_worker_by_lua,
# `require("shmprom_bench.stall").start("stall", 0.001)`. And /conns: the
# nginx's open client connections (stub_status's active), for
# wait_for_conns.
sub stall_locations {
    return <<'EOL';
        location = /conns {
            content_by_lua_block { ngx.say(ngx.var.connections_active) }
        }
        location = /stall/reset {
            content_by_lua_block { ngx.say(require("shmprom_bench.stall").reset()) }
        }
        location = /stall/read {
            content_by_lua_block {
                ngx.say(require("shmprom_bench.json").encode(
                    require("shmprom_bench.stall").read()))
            }
        }
EOL
}

# wait_for_conns(port, n, timeout): waits until the nginx answering /conns
# on `port` has at least n client connections open (this check's own
# included); false on timeout. A load's connections are all open before
# anything else is sent (so that, say, a scrape that blocks a worker cannot
# keep wrk from connecting to it).
sub wait_for_conns {
    my ($port, $n, $timeout) = @_;
    return wait_until(sub {
        my ($code, undef, undef, $body) = http_get("http://127.0.0.1:$port/conns", 2);
        return $code eq '200' && ($body // '') =~ /^(\d+)/ && $1 >= $n;
    }, $timeout // 10, 0.01);
}

sub _proc_stat_fields {
    my ($pid) = @_;
    my $s = slurp("/proc/$pid/stat");
    return () unless defined $s;
    my $r = rindex($s, ')');
    return () if $r < 0;
    return split ' ', substr($s, $r + 2);    # [0]=state [1]=ppid [11]=utime [12]=stime
}

sub _alive {
    my ($pid) = @_;
    my @f = _proc_stat_fields($pid);
    return @f && $f[0] ne 'Z' && $f[0] ne 'X';
}

# worker_pids(master): the live children of an nginx master
sub worker_pids {
    my ($m) = @_;
    my @k;
    opendir my $dh, '/proc' or return ();
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        my @f = _proc_stat_fields($pid);
        push @k, $pid if @f && $f[1] == $m && $f[0] ne 'Z';
    }
    closedir $dh;
    return sort { $a <=> $b } @k;
}

my $CLK_TCK;
sub clk_tck {
    $CLK_TCK //= do { my $t = `getconf CLK_TCK`; chomp $t; $t || 100 };
    return $CLK_TCK;
}

# cpu_ticks(pids...): sum of utime+stime (clock ticks) of the given pids
sub cpu_ticks {
    my $t = 0;
    for my $pid (@_) {
        my @f = _proc_stat_fields($pid);
        $t += $f[11] + $f[12] if @f;
    }
    return $t;
}

# ---------------------------------------------------------------- processes

# spawn_child(name, sub { ... }): fork a child running the code (for load
# helpers such as scrapers); returns its pid, recorded for cleanup
sub spawn_child {
    my ($name, $code) = @_;
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        %STARTED = ();
        $SIG{TERM} = $SIG{INT} = 'DEFAULT';
        $code->();
        POSIX::_exit(0);
    }
    $STARTED{$pid} = { name => $name, kind => 'child' };
    return $pid;
}

sub _stop_pid {
    my ($pid, $bound) = @_;
    return unless $pid && $STARTED{$pid};
    kill 'TERM', $pid;
    my $deadline = time + ($bound // 10);
    while (time < $deadline) {
        my $r = waitpid($pid, WNOHANG);
        last if $r == $pid || $r < 0;
        sleep 0.05;
    }
    if (waitpid($pid, WNOHANG) == 0) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    delete $STARTED{$pid};
}

sub stop_child { _stop_pid($_[0], 5) }

# wait_child(pid, seconds): wait for a child to exit by itself, stop it
# (TERM, then KILL) when it is still running after the bound
sub wait_child {
    my ($pid, $secs) = @_;
    return unless $pid && $STARTED{$pid};
    my $deadline = time + $secs;
    while (time < $deadline) {
        my $r = waitpid($pid, WNOHANG);
        if ($r == $pid || $r < 0) {
            delete $STARTED{$pid};
            return;
        }
        sleep 0.05;
    }
    _stop_pid($pid, 5);
}

# nginx_start(name => 'x', conf => TEXT, ready => URL, timeout => 15)
# Writes TEXT (placeholders $PREFIX) to WORK/name/conf/nginx.conf and runs
# nginx in the foreground (daemon off) in its own session; returns
# { pid, prefix, name, error_log } once URL answers (any HTTP status).
sub nginx_start {
    my (%o) = @_;
    my $prefix = "$WORK/$o{name}";
    make_path("$prefix/conf", "$prefix/logs", "$prefix/tmp");
    (my $conf = $o{conf}) =~ s/\$PREFIX\b/$prefix/g;
    spew("$prefix/conf/nginx.conf", $conf);
    my $err = "$prefix/logs/error.log";
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$prefix/logs/stdout.log";
        open STDERR, '>&', \*STDOUT;
        { exec $NGINX, '-p', "$prefix/", '-c', "$prefix/conf/nginx.conf",
               '-e', $err, '-g', 'daemon off;'; }
        POSIX::_exit(127);
    }
    $STARTED{$pid} = { name => $o{name}, kind => 'nginx' };
    my $n = { pid => $pid, prefix => $prefix, name => $o{name}, error_log => $err };
    my $ok = wait_until(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        my ($code) = http_get($o{ready}, 1);
        return $code && $code ne '000' ? 1 : 0;
    }, $o{timeout} // 20, 0.05);
    if (!$ok || $ok == -1) {
        my $tail = slurp($err) // '';
        $tail .= slurp("$prefix/logs/stdout.log") // '';
        delete $STARTED{$pid} if $ok && $ok == -1;
        _stop_pid($pid, 5);
        die "nginx $o{name} did not start:\n" . substr($tail, -3000) . "\n";
    }
    # the workers run once the ready URL answered; wait for all of them
    my $want = $o{workers} // 0;
    wait_until(sub { my @w = worker_pids($pid); @w >= $want }, 5) if $want;
    $n->{workers} = [ worker_pids($pid) ];
    return $n;
}

sub nginx_stop {
    my ($n) = @_;
    return unless $n && $n->{pid};
    _stop_pid($n->{pid}, 15);
    $n->{pid} = 0;
}

sub _cleanup {
    for my $pid (sort { $b <=> $a } keys %STARTED) {
        _stop_pid($pid, 5);
    }
}
END { my $rc = $?; _cleanup(); $? = $rc; }
$SIG{INT} = $SIG{TERM} = sub { logmsg "interrupted: stopping what was started"; _cleanup(); exit 130 };

# ---------------------------------------------------------------- HTTP

# http_get(url, timeout, outfile): (code, seconds, bytes, body) via curl
sub http_get {
    my ($url, $timeout, $outfile) = @_;
    die "only 127.0.0.1 is ever contacted: $url\n" unless $url =~ m{^http://127\.0\.0\.1:\d+/};
    $timeout //= 30;
    my $tmp = $outfile // "$WORK/.http.$$";
    my @cmd = ('curl', '-s', '--noproxy', '*', '--max-time', $timeout, '-o', $tmp,
               '-w', '%{http_code} %{time_total} %{size_download}', $url);
    open my $fh, '-|', @cmd or return ('000', 0, 0, '');
    my $w = <$fh> // '000 0 0';
    close $fh;
    my ($code, $t, $size) = split ' ', $w;
    my $body = defined $outfile ? undef : (slurp($tmp) // '');
    unlink $tmp unless defined $outfile;
    return ($code, $t, $size, $body);
}

sub http_get_json {
    my ($url, $timeout) = @_;
    my ($code, $t, $size, $body) = http_get($url, $timeout);
    die "GET $url: HTTP $code: " . substr($body // '', 0, 500) . "\n" unless $code eq '200';
    my $d = eval { JSON::PP->new->decode($body) };
    die "GET $url: not JSON: " . substr($body, 0, 500) . "\n" unless $d;
    return $d;
}

# ---------------------------------------------------------------- wrk

sub _secs {
    my ($v, $u) = @_;
    return $v / 1e6 if $u eq 'us';
    return $v / 1e3 if $u eq 'ms';
    return $v * 60 if $u eq 'm';
    return $v * 3600 if $u eq 'h';
    return $v;
}

# wrk_run(url => , threads => 2, conns => 50, secs => 10, latency => 1,
#         script => , args => [...], workers => [pids])
# Returns { rps, requests, secs, p50, p99, max, errors, non2xx, cmd,
#           cpu_ticks (of the given pids), cpu_us_per_req }
sub wrk_run {
    my (%o) = @_;
    die "only 127.0.0.1: $o{url}\n" unless $o{url} =~ m{^http://127\.0\.0\.1:\d+/};
    my @cmd = ('wrk', '-t' . ($o{threads} // 2), '-c' . ($o{conns} // 50),
               '-d' . ($o{secs} // 10) . 's');
    push @cmd, '--latency' if $o{latency};
    push @cmd, '--timeout', '10s';
    push @cmd, '-s', $o{script} if $o{script};
    push @cmd, $o{url};
    push @cmd, '--', @{ $o{args} } if $o{args};
    my @pids = @{ $o{workers} // [] };
    my $t0 = cpu_ticks(@pids);
    my @w0 = map { cpu_ticks($_) } @pids;
    my $out = '';
    my $pid = open(my $fh, '-|') // die "fork: $!\n";
    if (!$pid) {
        open STDERR, '>&', \*STDOUT;
        { exec @cmd; }
        POSIX::_exit(127);
    }
    $STARTED{$pid} = { name => 'wrk', kind => 'wrk' };
    my $deadline = ($o{secs} // 10) + 30;
    eval {
        local $SIG{ALRM} = sub { die "wrk timeout\n" };
        alarm $deadline;
        local $/;
        $out = <$fh> // '';
        alarm 0;
    };
    alarm 0;
    if ($@) { _stop_pid($pid, 2); }
    close $fh;
    delete $STARTED{$pid};
    my $t1 = cpu_ticks(@pids);
    my %r = (cmd => join(' ', @cmd), raw => $out, cpu_ticks => $t1 - $t0);
    # each worker's share of the workers' CPU time over the run
    my @w = map { cpu_ticks($pids[$_]) - $w0[$_] } 0 .. $#pids;
    $r{worker_shares} = [ map { $r{cpu_ticks} > 0 ? $_ / $r{cpu_ticks} : 0 } @w ];
    ($r{rps}) = $out =~ /Requests\/sec:\s+([\d.]+)/;
    if ($out =~ /(\d+) requests in ([\d.]+)(us|ms|s|m)/) {
        $r{requests} = $1;
        $r{secs} = _secs($2, $3);
    }
    if ($out =~ /Latency\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)/) {
        $r{avg} = _secs($1, $2);
        $r{max} = _secs($5, $6);
    }
    for my $p (50, 90, 99) {
        $r{"p$p"} = _secs($1, $2) if $out =~ /^\s+$p(?:\.000)?%\s+([\d.]+)(us|ms|s|m)/m;
    }
    $r{non2xx} = $out =~ /Non-2xx or 3xx responses:\s+(\d+)/ ? $1 : 0;
    $r{errors} = 0;
    if ($out =~ /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/) {
        $r{errors} = $1 + $2 + $3 + $4;
    }
    die "wrk gave no result ($r{cmd}):\n$out\n" unless $r{rps} && $r{requests};
    $r{cpu_us_per_req} = $r{cpu_ticks} / clk_tck() * 1e6 / $r{requests} if @pids;
    return \%r;
}

# ---------------------------------------------------------------- numbers

sub median {
    my @v = sort { $a <=> $b } grep { defined } @_;
    return undef unless @v;
    return $v[$#v / 2] if @v % 2;
    return ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}

sub minmax {
    my @v = sort { $a <=> $b } grep { defined } @_;
    return (undef, undef) unless @v;
    return ($v[0], $v[-1]);
}

# fmt_num(x, digits): 3 significant digits by default, thousands apart
sub fmt_num {
    my ($x, $d) = @_;
    return 'n/a' unless defined $x;
    $d //= 3;
    return '0' if $x == 0;
    if ($x == int($x) && abs($x) >= 1000) {
        my $s = sprintf('%d', $x);
        1 while $s =~ s/^(-?\d+)(\d{3})/$1,$2/;
        return $s;
    }
    my $mag = int(log(abs $x) / log(10));
    $mag-- if abs($x) < 1;
    my $dec = $d - 1 - $mag;
    $dec = 0 if $dec < 0;
    my $s = sprintf("%.${dec}f", $x);
    1 while $s =~ s/^(-?\d+)(\d{3})/$1,$2/;
    return $s;
}

sub md_table {
    my ($head, @rows) = @_;
    my $s = '| ' . join(' | ', @$head) . " |\n";
    $s .= '|' . join('|', map { '---' } @$head) . "|\n";
    $s .= '| ' . join(' | ', map { $_ // '' } @$_) . " |\n" for @rows;
    return $s;
}

# add_target(key, what, target, measured, verdict): one line of the summary
# against the issue's targets (verdict starts with "met" or "MISSED")
sub add_target {
    my @f = map { my $x = $_ // ''; $x =~ s/[\t\n]/ /g; $x } @_;
    open my $fh, '>>', "$OUT/targets.tsv" or die "$OUT/targets.tsv: $!\n";
    print {$fh} join("\t", @f), "\n";
    close $fh;
}

sub write_fragment {
    my ($name, $text) = @_;
    spew("$OUT/$name.md", $text);
    logmsg "wrote $OUT/$name.md";
}

1;
