#!/usr/bin/env perl
# bench/soak.pl: a bounded soak (issue 7): mixed load and churn against a
# real nginx with 2 workers, for SOAK_SECONDS (default 600). Not part of
# `make bench`; run it on its own:
#
#   perl bench/soak.pl                  10 minutes, appends "## Soak" to bench/RESULTS.md
#   SOAK_SECONDS=60 perl bench/soak.pl  shorter
#   SOAK_RESULTS=path                   write the section elsewhere ("-": stdout only)
#   SOAK_WRK_CONNS=16 SOAK_WRK_THREADS=1  the wrk load (default 1 thread, 16 connections)
#   SOAK_ID_BASE=990000                 churn ids start there (default 0): with 990000
#                                       they pass 1,000,000, one key byte longer, 5 s in
#
# nginx (t/lib/ShmpromTest.pm, 2 workers, reuseport) with two zones:
#   soak      (4m, reuse_grace = 1): stable series, recorded in log_by_lua for
#             every request to /s/N (N in 0..99): soak_requests_total{path,status}
#             and soak_duration_seconds{path} (default buckets) through
#             labels() handles cached per path; plus churn: soak_churn_total{id}
#             label sets created by /churn and deleted with family:del by the
#             /churn request one second later.
#   soak_ttl  (1m, ttl = 2, reuse_grace = 1): soak_idle_total{id} label sets
#             created once by /idle and then left idle (they expire), and
#             soak_hot_total{id="h"} updated on every tick (never expires).
# Load: wrk on /s/N for the whole run; the driver (this script) sends /churn,
# /idle and /hot every 0.25 s at a pace set from each zone's series capacity,
# scrapes both zones' /metrics every second, and every 10 s samples each
# worker's RSS (/proc/PID/status VmRSS), shmprom_zone_bytes{type="used"},
# shmprom_series per family and the requests counted. At the end: m:check of
# both zones, refusals, errors, the error log.
#
# A benchmark, not a test: nothing is asserted. The verdict compares the
# last third of the samples with the middle third (medians). Bounded in time
# (the run, each request, wrk's exit), 127.0.0.1 only, stops what it started
# by pid.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../t/lib";
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);
use POSIX qw(:sys_wait_h strftime);
use Time::HiRes qw(time sleep);

my $REPO    = repo_root();
my $SECS    = $ENV{SOAK_SECONDS} // 600;
my $RESULTS = $ENV{SOAK_RESULTS} // "$REPO/bench/RESULTS.md";
my $THREADS = $ENV{SOAK_WRK_THREADS} // 1;
my $CONNS   = $ENV{SOAK_WRK_CONNS} // 16;
my $TICK    = 0.25;    # churn pace
my $SAMPLE  = 10;      # seconds between samples
my $PATHS   = 100;
my $TTL     = 2;
my $GRACE   = 1;
my $IDBASE  = $ENV{SOAK_ID_BASE} // 0;
die "soak: SOAK_ID_BASE must be a whole number\n" unless $IDBASE =~ /^\d+$/;

die "soak: target/release/libshmprom.so missing (make build)\n"
    unless -e "$REPO/target/release/libshmprom.so";
for my $tool (qw(wrk)) {
    system("command -v $tool >/dev/null 2>&1") == 0 or die "soak: $tool is missing\n";
}

sub logmsg { printf STDERR "[soak %s] %s\n", strftime('%H:%M:%S', localtime), "@_" }

my $n = ShmpromTest->new(
    workers     => 2,
    ports       => 2,
    listen      => 'reuseport',
    error_level => 'notice',
    init        => <<"LUA",
        local shmprom = require "resty.shmprom"
        soak_m = shmprom.new{ zone = "soak", size = "4m", reuse_grace = $GRACE }
        soak_c = soak_m:counter("soak_requests_total", "Requests to /s/N.", { "path", "status" })
        soak_h = soak_m:histogram("soak_duration_seconds", "Request time of /s/N.", { "path" })
        soak_churn = soak_m:counter("soak_churn_total", "Label sets created, deleted a second later.", { "id" })
        soak_t = shmprom.new{ zone = "soak_ttl", size = "1m", ttl = $TTL, reuse_grace = $GRACE }
        soak_idle = soak_t:counter("soak_idle_total", "Created once, then idle until they expire.", { "id" })
        soak_hot = soak_t:counter("soak_hot_total", "Updated on every tick of the driver.", { "id" })
        soak_cache = {}
LUA
    init_worker => "        soak_m:init_worker()\n        soak_t:init_worker()",
    server      => <<'NGX',
        location /s/ {
            return 200 "ok\n";
            log_by_lua_block {
                local path = ngx.var.uri
                local s = soak_cache[path]
                if not s then
                    local c = soak_c:labels(path, ngx.status)
                    local h = soak_h:labels(path)
                    if not (c and h) then return end
                    s = { c = c, h = h }
                    soak_cache[path] = s
                end
                s.c:inc(1)
                s.h:observe(ngx.now() - ngx.req.start_time())
            }
        }
NGX
    servers => <<'NGX' =~ s/\bIDBASE\b/$IDBASE/gr,
    server {
        listen 127.0.0.1:$PORT2 reuseport;
        # create ids new_from..new_to, delete ids del_from..del_to (created by
        # an earlier request); answers "created refused deleted" and the first
        # error in X-Err
        location = /churn {
            content_by_lua_block {
                local a, b = tonumber(ngx.var.arg_new_from), tonumber(ngx.var.arg_new_to)
                local c, d = tonumber(ngx.var.arg_del_from), tonumber(ngx.var.arg_del_to)
                local good, bad, gone, first = 0, 0, 0, nil
                if a and b then
                    for i = a, b do
                        local ok, err = soak_churn:inc(1, { "c" .. (i + IDBASE) })
                        if ok then good = good + 1 else bad = bad + 1 first = first or err end
                    end
                end
                if c and d then
                    for i = c, d do
                        local ok, err = soak_churn:del({ "c" .. (i + IDBASE) })
                        if ok then gone = gone + 1 else first = first or err end
                    end
                end
                if first then ngx.header["X-Err"] = first end
                ngx.say(good, " ", bad, " ", gone)
            }
        }
        location = /idle {
            content_by_lua_block {
                local a, b = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
                local good, bad, first = 0, 0, nil
                for i = a, b do
                    local ok, err = soak_idle:inc(1, { "i" .. i })
                    if ok then good = good + 1 else bad = bad + 1 first = first or err end
                end
                if first then ngx.header["X-Err"] = first end
                ngx.say(good, " ", bad)
            }
        }
        location = /hot {
            content_by_lua_block {
                local ok, err = soak_hot:inc(1, { "h" })
                if not ok then ngx.status = 500 ngx.say(err) return end
                ngx.say("ok")
            }
        }
        location = /metrics { content_by_lua_block { soak_m:collect() } }
        location = /metrics/ttl { content_by_lua_block { soak_t:collect() } }
        location = /check {
            content_by_lua_block {
                local s, e = soak_m:check()
                local s2, e2 = soak_t:check()
                ngx.say("soak: ", s or ("FAILED " .. tostring(e)))
                ngx.say("soak_ttl: ", s2 or ("FAILED " .. tostring(e2)))
            }
        }
    }
NGX
);

my $wrk_pid;
my $wrk_out = $n->prefix . '/wrk.out';
END {
    if ($wrk_pid && waitpid($wrk_pid, WNOHANG) == 0) {
        kill 'TERM', $wrk_pid;
        waitpid($wrk_pid, 0);
    }
}
$SIG{INT} = $SIG{TERM} = sub { die "soak: interrupted\n" };

# what nginx loads, taken when it starts (a commit made during the run does not count)
my $commit = `git -C $REPO rev-parse --short HEAD 2>/dev/null` // ''; chomp $commit;
my $dirty = `git -C $REPO status --porcelain -- src lua 2>/dev/null` ? ' (src/lua modified)' : '';
my $libsha = `sha256sum $REPO/target/release/libshmprom.so` // ''; $libsha = substr($libsha, 0, 16);
$n->start;
my @pids0 = $n->worker_pids;
logmsg "nginx up (prefix " . $n->prefix . "), workers @pids0; soak $SECS s";

sub get2 { my ($path) = @_; return $n->request(GET => [ $path, 2 ], timeout => 10) }

sub scrape {
    my ($which) = @_;
    my $t = time;
    my $r = get2($which eq 'ttl' ? '/metrics/ttl' : '/metrics');
    my $dt = time - $t;
    return (undef, $dt, "status $r->{status}") unless $r->{status} == 200;
    my $p = eval { parse_metrics($r->{body}) };
    return (undef, $dt, "parse: $@") unless $p;
    return ($p, $dt, undef);
}

my ($pm, undef, $epm) = scrape('main');
die "soak: no /metrics: $epm\n" unless $pm;
my ($pt, undef, $ept) = scrape('ttl');
die "soak: no /metrics/ttl: $ept\n" unless $pt;
my $capA = metric_value($pm, 'shmprom_series_capacity') // 0;
my $capB = metric_value($pt, 'shmprom_series_capacity') // 0;
my $sizeA = metric_value($pm, 'shmprom_zone_bytes', type => 'capacity') // 0;
my $sizeB = metric_value($pt, 'shmprom_zone_bytes', type => 'capacity') // 0;
# live churn series: about rate * (1 s alive + grace); idle: rate * (ttl +
# sweep period (1 s) + grace + 1): keep both at ~40 % of the capacity
my $rateA = int(0.4 * $capA / (1 + $GRACE));
$rateA = 2000 if $rateA > 2000;
my $rateB = int(0.4 * $capB / ($TTL + 1 + $GRACE + 1));
$rateB = 1000 if $rateB > 1000;
logmsg "zone soak: $capA series capacity, $sizeA bytes; zone soak_ttl: $capB, $sizeB bytes; "
     . "churn $rateA/s (del), $rateB/s (idle)";

# wrk: /s/0 .. /s/99 in turn
my $wrk_lua = $n->prefix . '/soak.lua';
open my $wl, '>', $wrk_lua or die "soak: $wrk_lua: $!\n";
print {$wl} "local n = 0\nrequest = function()\n  n = n + 1\n"
          . "  return wrk.format('GET', '/s/' .. (n % $PATHS))\nend\n";
close $wl;
my @wrk = ('wrk', "-t$THREADS", "-c$CONNS", "-d${SECS}s", '--timeout', '10s', '-s', $wrk_lua,
           'http://127.0.0.1:' . $n->port . '/');
$wrk_pid = fork // die "soak: fork: $!\n";
if (!$wrk_pid) {
    open STDOUT, '>', $wrk_out or POSIX::_exit(127);
    open STDERR, '>&', \*STDOUT;
    exec @wrk or POSIX::_exit(127);
}

sub rss_kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while (my $l = <$fh>) { return $1 if $l =~ /^VmRSS:\s+(\d+)\s+kB/ }
    return undef;
}

my %A = (done => 0, deleted_to => 0, good => 0, bad => 0, gone => 0, err => undef, reqs => 0, fail => 0);
my %B = (done => 0, good => 0, bad => 0, err => undef, fail => 0);
my ($hot, $hot_fail) = (0, 0);
my %scr = (n => 0, fail => 0, max => 0, sum => 0, err => undef);
my @samples;
my $prev_req = 0;
my $t0 = time;
my $last_sample = 0;
my ($lastA, $lastB);
my $ticks = int($SECS / $TICK);
for my $k (1 .. $ticks) {
    my $el = time - $t0;
    # A: create the ids due by now, delete those created >= 1 s ago
    my $ta = int($rateA * $el);
    my $da = int($rateA * ($el - 1));
    $da = 0 if $da < 0;
    $da = $A{done} if $da > $A{done};
    if ($ta > $A{done} || $da > $A{deleted_to}) {
        my $q = '';
        $q .= "new_from=$A{done}&new_to=" . ($ta - 1) if $ta > $A{done};
        $q .= ($q ? '&' : '') . "del_from=$A{deleted_to}&del_to=" . ($da - 1) if $da > $A{deleted_to};
        my $r = get2("/churn?$q");
        $A{reqs}++;
        if ($r->{status} == 200 && $r->{body} =~ /^(\d+) (\d+) (\d+)/) {
            $A{good} += $1; $A{bad} += $2; $A{gone} += $3;
        } else {
            $A{fail}++;
        }
        $A{err} //= $r->{headers}{'x-err'};
        $A{done} = $ta if $ta > $A{done};
        $A{deleted_to} = $da if $da > $A{deleted_to};
    }
    # B: idle ids, created once
    my $tb = int($rateB * $el);
    if ($tb > $B{done}) {
        my $r = get2("/idle?from=$B{done}&to=" . ($tb - 1));
        if ($r->{status} == 200 && $r->{body} =~ /^(\d+) (\d+)/) { $B{good} += $1; $B{bad} += $2 }
        else { $B{fail}++ }
        $B{err} //= $r->{headers}{'x-err'};
        $B{done} = $tb;
    }
    if (get2('/hot')->{status} == 200) { $hot++ } else { $hot_fail++ }
    # scrape both zones every second
    if ($k % int(1 / $TICK) == 0) {
        for my $z (qw(main ttl)) {
            my ($p, $dt, $err) = scrape($z);
            $scr{n}++;
            $scr{sum} += $dt;
            $scr{max} = $dt if $dt > $scr{max};
            if (!$p) { $scr{fail}++; $scr{err} //= "$z: $err"; next }
            if ($z eq 'main') { $lastA = $p } else { $lastB = $p }
        }
    }
    # sample every $SAMPLE seconds (from the scrapes just made)
    if ($el - $last_sample >= $SAMPLE - $TICK / 2 && $lastA && $lastB) {
        $last_sample = $el;
        my @w = $n->worker_pids;
        my %rss = map { $_ => rss_kb($_) } @w;
        my $req = metric_sum($lastA, 'soak_requests_total');
        my %s = (
            t        => $el,
            workers  => [@w],
            rss      => \%rss,
            usedA    => metric_value($lastA, 'shmprom_zone_bytes', type => 'used'),
            usedB    => metric_value($lastB, 'shmprom_zone_bytes', type => 'used'),
            series   => { map { ($_->[0]{family} => $_->[1]) }
                          metric_series($lastA, 'shmprom_series'), metric_series($lastB, 'shmprom_series') },
            req      => $req,
            rps      => ($req - $prev_req) / $SAMPLE,
            reused   => (metric_value($lastA, 'shmprom_series_reused_total') // 0)
                      + (metric_value($lastB, 'shmprom_series_reused_total') // 0),
            expired  => metric_value($lastB, 'shmprom_series_expired_total') // 0,
            dropped  => metric_sum($lastA, 'shmprom_series_dropped_total')
                      + metric_sum($lastB, 'shmprom_series_dropped_total'),
            churned  => $A{good},
            idled    => $B{good},
        );
        $prev_req = $req;
        push @samples, \%s;
        logmsg sprintf('t=%4.0fs dropped %d; rss %s kB; used %d / %d B; series churn %s idle %s; req %d (%.0f/s); '
                       . 'created %d churn, %d idle; expired %d',
                       $el, $s{dropped}, join('/', map { $rss{$_} // '?' } @w), $s{usedA} // -1, $s{usedB} // -1,
                       $s{series}{soak_churn_total} // '?', $s{series}{soak_idle_total} // '?',
                       $req, $s{rps}, $A{good}, $B{good}, $s{expired});
    }
    last if time - $t0 >= $SECS;
    my $next = $t0 + $k * $TICK;    # pace: the next tick of the schedule
    my $left = $next - time;
    sleep($left) if $left > 0;
}
my $elapsed = time - $t0;

# wrk ends at its -d; bounded wait, then TERM by pid
my $wrk_done = wait_until(sub { waitpid($wrk_pid, WNOHANG) != 0 }, timeout => 30);
if (!$wrk_done) { kill 'TERM', $wrk_pid; waitpid($wrk_pid, 0) }
undef $wrk_pid;
my $wrk_text = do { local (@ARGV, $/) = ($wrk_out); <> } // '';
my ($wrk_reqs) = $wrk_text =~ /(\d+) requests in/;
my ($wrk_rps) = $wrk_text =~ /Requests\/sec:\s+(\S+)/;
my ($wrk_non2xx) = $wrk_text =~ /Non-2xx or 3xx responses: (\d+)/;
my ($wrk_sockerr) = $wrk_text =~ /Socket errors: (.*)/;

# the driver's last ids: delete the churn ids still live (wait out nothing)
get2("/churn?del_from=$A{deleted_to}&del_to=" . ($A{done} - 1)) if $A{done} > $A{deleted_to};

my ($fm) = scrape('main');
my ($ft) = scrape('ttl');
my $check = get2('/check')->{body} // '';
chomp $check;
my @errlines = $n->error_lines;
my @pids1 = $n->worker_pids;
my $rss_end = { map { $_ => rss_kb($_) } @pids1 };
$n->stop;

my $dropped = ($fm ? metric_sum($fm, 'shmprom_series_dropped_total') : -1)
            + ($ft ? metric_sum($ft, 'shmprom_series_dropped_total') : -1);
my $errors_total = ($fm ? metric_sum($fm, 'shmprom_errors_total') : -1)
                 + ($ft ? metric_sum($ft, 'shmprom_errors_total') : -1);
my %errkinds;
for my $p (grep { $_ } $fm, $ft) {
    for my $s (metric_series($p, 'shmprom_errors_total')) { $errkinds{ $s->[0]{kind} } += $s->[1] if $s->[1] }
}
my $counted = $fm ? metric_sum($fm, 'soak_requests_total') : 0;
my $hot_val = $ft ? metric_value($ft, 'soak_hot_total', id => 'h') // 0 : 0;
my $churn_live = $fm ? metric_value($fm, 'shmprom_series', family => 'soak_churn_total') // 0 : -1;
my $expired = $ft ? metric_value($ft, 'shmprom_series_expired_total') // 0 : -1;
my $reusedA = $fm ? metric_value($fm, 'shmprom_series_reused_total') // 0 : -1;
my $reusedB = $ft ? metric_value($ft, 'shmprom_series_reused_total') // 0 : -1;

# ---------------------------------------------------------------- verdict
sub median {
    my @v = sort { $a <=> $b } grep { defined } @_;
    return undef unless @v;
    return @v % 2 ? $v[$#v / 2] : ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}
my $ns = @samples;
my @mid = @samples[ int($ns / 3) .. int(2 * $ns / 3) - 1 ];
my @last = @samples[ int(2 * $ns / 3) .. $ns - 1 ];
my $same_workers = join(',', @pids0) eq join(',', @pids1);
sub change {
    my ($get) = @_;
    my $m = median(map { $get->($_) } @mid);
    my $l = median(map { $get->($_) } @last);
    return (undef, $m, $l) unless defined $m && defined $l && $m;
    return (100 * ($l - $m) / $m, $m, $l);
}
my @verdict;
my $flat = 1;
my $LIMIT = 5;    # % change last third vs middle third counted as flat
for my $i (0 .. $#pids0) {
    my $pid = $pids0[$i];
    my ($c, $m, $l) = change(sub { $_[0]{rss}{$pid} });
    if (!defined $c) { push @verdict, "worker $i (pid $pid): RSS not sampled in both thirds"; $flat = 0; next }
    $flat = 0 if abs($c) > $LIMIT;
    push @verdict, sprintf('worker %d RSS: middle third %.1f MiB, last third %.1f MiB (%+.2f%%)',
                           $i, $m / 1024, $l / 1024, $c);
}
for my $z ([ 'soak', 'usedA', $sizeA ], [ 'soak_ttl', 'usedB', $sizeB ]) {
    my ($name, $key, $size) = @$z;
    my ($c, $m, $l) = change(sub { $_[0]{$key} });
    if (!defined $c) { push @verdict, "zone $name: not sampled in both thirds"; $flat = 0; next }
    $flat = 0 if abs($c) > $LIMIT;
    my ($max) = sort { $b <=> $a } map { $_->{$key} // 0 } @samples;
    push @verdict, sprintf('zone %s used: middle third %s B, last third %s B (%+.2f%%); highest sample %s B = %.1f%% of %s B',
                           $name, fmt($m), fmt($l), $c, fmt($max), $size ? 100 * $max / $size : 0, fmt($size));
}

sub fmt {
    my ($v) = @_;
    return '-' unless defined $v;
    my $s = sprintf('%.0f', $v);
    1 while $s =~ s/^(-?\d+)(\d{3})/$1,$2/;
    return $s;
}

my $machine = do {
    my $cpu = `grep -m1 'model name' /proc/cpuinfo` // '';
    $cpu =~ s/.*:\s*//; chomp $cpu;
    my $nproc = `nproc` // ''; chomp $nproc;
    my $mem = `awk '/MemTotal/ {printf "%.1f GiB", \$2/1048576}' /proc/meminfo` // '';
    my $kern = `uname -r` // ''; chomp $kern;
    my $ngx = `/usr/sbin/nginx -v 2>&1` // ''; chomp $ngx; $ngx =~ s/^nginx version: //;
    my $load = `cut -d' ' -f1-3 /proc/loadavg` // ''; chomp $load;
    "$nproc cores ($cpu), $mem, kernel $kern, $ngx; load average at the end $load";
};
my $date = strftime('%Y-%m-%d %H:%M UTC', gmtime);

my $md = "## Soak\n\n";
$md .= "`perl bench/soak.pl` (SOAK_SECONDS=$SECS" . ($SECS == 600 ? ', the default' : '') . "), "
     . "$date, shmprom $commit$dirty at the start (libshmprom.so sha256 $libsha). Machine: $machine. "
     . "A benchmark: nothing is asserted.\n\n";
$md .= "nginx with 2 workers (t/lib/ShmpromTest.pm, reuseport), two zones. `soak` (4m, "
     . "reuse_grace = $GRACE, " . fmt($capA) . " series capacity): stable series recorded in "
     . "log_by_lua for every request to /s/N, N in 0..99 (`soak_requests_total{path,status}`, "
     . "`soak_duration_seconds{path}` with the default buckets, through labels() handles), "
     . "load `wrk -t$THREADS -c$CONNS -d${SECS}s` cycling over the 100 paths; and churn: "
     . "`soak_churn_total{id}` label sets (ids `c" . ($IDBASE) . "` on) created by a /churn request at $rateA/s and deleted "
     . "with `family:del` by the /churn request one second later. `soak_ttl` (1m, ttl = $TTL, "
     . "reuse_grace = $GRACE, " . fmt($capB) . " series capacity): `soak_idle_total{id}` label "
     . "sets created once at $rateB/s and left to expire, and one `soak_hot_total` series "
     . "updated every 0.25 s. Both zones' /metrics scraped every second and parsed; every "
     . "${SAMPLE}s a sample of each worker's VmRSS, `shmprom_zone_bytes{type=\"used\"}`, "
     . "`shmprom_series` per family and the requests counted.\n\n";
# condensed table: the first sample, then one a minute, and the last
my @rows;
my $every = $ns > 12 ? int(60 / $SAMPLE) : 1;
for my $i (0 .. $ns - 1) {
    next unless $i == 0 || $i == $ns - 1 || ($i + 1) % $every == 0;
    my $s = $samples[$i];
    push @rows, [ sprintf('%.0f', $s->{t}),
                  join(' / ', map { sprintf '%.1f', ($s->{rss}{$_} // 0) / 1024 } @pids0),
                  fmt($s->{usedA}), fmt($s->{usedB}),
                  join(' / ', map { fmt($s->{series}{$_}) }
                       qw(soak_requests_total soak_duration_seconds soak_churn_total)),
                  join(' / ', map { fmt($s->{series}{$_}) } qw(soak_idle_total soak_hot_total)),
                  fmt($s->{req}), fmt($s->{rps}), fmt($s->{churned}), fmt($s->{idled}),
                  fmt($s->{expired}), fmt($s->{reused}), fmt($s->{dropped}) ];
}
$md .= "| t s | worker RSS MiB (w0 / w1) | soak used B | soak_ttl used B "
     . "| series soak: requests / duration / churn | series soak_ttl: idle / hot "
     . "| requests counted | req/s (last 10 s) | churn label sets created | idle label sets created "
     . "| expired | reused slots | refused (dropped_total) |\n";
$md .= "|" . ("---|" x 13) . "\n";
$md .= '| ' . join(' | ', @$_) . " |\n" for @rows;
$md .= "\n($ns samples, one every ${SAMPLE}s; the table shows the first, one a minute and the last.)\n\n";
my ($first_drop) = grep { ($_->{dropped} // 0) > 0 } @samples;
$md .= "**Verdict** (medians of the last third of the samples against the middle third; flat = "
     . "within $LIMIT%): RSS and zone bytes " . ($flat ? '**flat**' : '**NOT flat**') . "; "
     . ($dropped ? sprintf('**new series refused**: %s, first seen in the sample at t = %s s',
                           fmt($dropped), $first_drop ? sprintf('%.0f', $first_drop->{t}) : 'end')
                 : 'no new series refused') . ".\n\n";
$md .= "- $_\n" for @verdict;
$md .= sprintf("- workers: %s for the whole run (pids %s%s)\n",
               $same_workers ? 'the same' : '**replaced**', "@pids0", $same_workers ? '' : " -> @pids1");
$md .= sprintf("- requests: wrk %s in %.0f s (%s req/s), non-2xx %s, socket errors %s; counted in "
               . "`soak_requests_total` %s (%s)\n",
               fmt($wrk_reqs), $elapsed, $wrk_rps // '?', $wrk_non2xx // 0, $wrk_sockerr // 'none',
               fmt($counted), defined $wrk_reqs
                   ? ($counted == $wrk_reqs ? 'equal' : sprintf('%+d against wrk: wrk counts only complete responses; '
                                                                 . 'log_by_lua also runs for the requests of its '
                                                                 . 'connections cut at its end', $counted - $wrk_reqs))
                   : '?');
$md .= sprintf("- churn: %s label sets created and %s `del` calls (%.0fx the zone's "
               . "capacity), %s refused%s; %s still live at the end; slots reused %s\n",
               fmt($A{good}), fmt($A{gone}), $capA ? $A{good} / $capA : 0, fmt($A{bad}),
               $A{err} ? " (first: $A{err})" : '', fmt($churn_live), fmt($reusedA));
$md .= sprintf("- ttl: %s idle label sets created (%.0fx the zone's capacity), %s refused%s, "
               . "%s expired, slots reused %s; the hot series reads %s for %s updates (%s)\n",
               fmt($B{good}), $capB ? $B{good} / $capB : 0, fmt($B{bad}),
               $B{err} ? " (first: $B{err})" : '', fmt($expired), fmt($reusedB), fmt($hot_val),
               fmt($hot), $hot_val == $hot ? 'exact: never expired' : '**differs**');
$md .= sprintf("- refusals: `shmprom_series_dropped_total` %s (both zones); errors: "
               . "`shmprom_errors_total` %s%s\n",
               fmt($dropped), fmt($errors_total),
               %errkinds ? ' (' . join(', ', map { "$_ $errkinds{$_}" } sort keys %errkinds) . ')' : '');
$md .= sprintf("- scrapes: %d (both zones every second), %d failed%s, mean %.1f ms, longest %.1f ms\n",
               $scr{n}, $scr{fail}, $scr{err} ? " (first: $scr{err})" : '',
               $scr{n} ? 1000 * $scr{sum} / $scr{n} : 0, 1000 * $scr{max});
$md .= "- driver requests failing: churn $A{fail}, idle $B{fail}, hot $hot_fail\n";
$md .= "- consistency (`m:check` through /check at the end): " . join('; ', split /\n/, $check) . "\n";
$md .= sprintf("- error log: %d lines at [error] or worse%s\n", scalar @errlines,
               @errlines ? " (first: `" . substr($errlines[0], 0, 200) . "`)" : '');
$md .= "\n";

print $md;
if ($RESULTS ne '-') {
    my $old = -e $RESULTS ? do { local (@ARGV, $/) = ($RESULTS); <> } : '';
    # replace an earlier "## Soak" section, else append
    if ($old =~ /^## Soak\n/m) {
        $old =~ s/^## Soak\n.*?(?=^## |\z)/$md/ms;
    } else {
        $old =~ s/\n*\z/\n\n/ if length $old;
        $old .= $md;
    }
    open my $fh, '>', "$RESULTS.tmp.$$" or die "soak: $RESULTS: $!\n";
    print {$fh} $old;
    close $fh or die "soak: $RESULTS: $!\n";
    rename "$RESULTS.tmp.$$", $RESULTS or die "soak: $RESULTS: $!\n";
    logmsg "wrote the Soak section to $RESULTS";
}
