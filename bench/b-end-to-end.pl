#!/usr/bin/env perl
# Bench (b): end to end with wrk on loopback.
#
# Part 1, the README example: one nginx (2 workers) with one server per
# config on its own port, all with the same content handler; only the log
# phase differs. wrk loads one port at a time; configs alternate (rotated
# order per round); requests/s from wrk and worker CPU time per request
# (utime+stime of the worker pids from /proc, before/after) are taken per
# run, medians over the rounds, ratios per round against the baseline of the
# same round.
#
# Part 2, the gateway preset: scripts/run-gateway.sh starts the embedded
# default (3 storage nodes + gateway) on free ports; a second gateway runs
# the same rendered config with the two metric calls (set_by_lua
# gateway.begin(), log_by_lua gateway.log()) removed, on other ports, in
# front of the same nodes. wrk GETs a 1 KiB file through one gateway at a
# time, alternating.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw(conf_head shmprom_module $REPO $WORK $QUICK $PEER free_ports nginx_start
             nginx_stop http_get wrk_run median minmax fmt_num md_table
             write_fragment spew slurp logmsg worker_pids add_target $OUT);

my $SECS = $ENV{BENCH_SECS} || ($QUICK ? 2 : 10);
my $ROUNDS = $ENV{BENCH_ROUNDS} || ($QUICK ? 3 : 5);
my $WARM = $QUICK ? 1 : 2;
my @WRK = (threads => 2, conns => 50, secs => $SECS, latency => 1);
my $only = $ENV{BENCH_B_PART} || 'all';

# The README example's metrics and log functions, and the peer's buckets
# (the same metric set): bench/lua/shmprom_bench/readme.lua, shared with
# bench/log-callgrind.sh.
my $README_LUA = "$FindBin::Bin/lua/shmprom_bench/readme.lua";

# The README example (README.md, "A complete example") calls a function
# defined in init_by_lua from log_by_lua (LuaJIT compiles it; it never
# compiles the code of a *_by_lua_block chunk): it reads one variable
# ($host) and takes the status and the request time from ngx.status and
# ngx.now() - ngx.req.start_time(); `vars` calls a function doing the same
# reads and recording nothing (it keeps the values, so that the compiler
# cannot drop the reads). `*_inline` are the same with the code in the
# log_by_lua_block itself. The `*_ngxvar` configs are the shape of
# nginx-lua-prometheus's README (four ngx.var reads: $server_name twice,
# $status, $request_time), with shmprom, with the peer, and with nothing
# recorded.
my %LOG = (
    plain => '',
    vars => <<'EOL',
        log_by_lua_block { log_vars() }
EOL
    readme => <<'EOL',
        log_by_lua_block { log_request() }
EOL
    vars_inline => <<'EOL',
        log_by_lua_block {
            local host = ngx.var.host
            local status, rt = ngx.status, ngx.now() - ngx.req.start_time()
        }
EOL
    readme_inline => <<'EOL',
        log_by_lua_block {
            local host = ngx.var.host
            metric_requests:inc(1, host, ngx.status)
            metric_latency:observe(ngx.now() - ngx.req.start_time(), host)
        }
EOL
    readme_module => <<'EOL',
        shmprom_inc nginx_http_requests_total host=$host status=$status;
        shmprom_observe nginx_http_request_duration_seconds $request_time host=$host;
EOL
    vars_ngxvar => <<'EOL',
        log_by_lua_block {
            local host, status = ngx.var.server_name, ngx.var.status
            local rt, host2 = tonumber(ngx.var.request_time), ngx.var.server_name
        }
EOL
    readme_ngxvar => <<'EOL',
        log_by_lua_block {
            metric_requests:inc(1, {ngx.var.server_name, ngx.var.status})
            metric_latency:observe(tonumber(ngx.var.request_time), {ngx.var.server_name})
        }
EOL
    peer_readme => <<'EOL',
        log_by_lua_block {
            peer_requests:inc(1, {ngx.var.server_name, ngx.var.status})
            peer_latency:observe(tonumber(ngx.var.request_time), {ngx.var.server_name})
        }
EOL
);
my %DESC = (
    plain => 'plain nginx: `return 200 "hello\n"`, no log_by_lua',
    vars => 'same + log_by_lua calling a function (`log_vars`, below) that does the README example\'s reads (`ngx.var.host`, `ngx.status`, `ngx.now() - ngx.req.start_time()`) and keeps the values, recording nothing',
    readme => 'same + the README example: log_by_lua calls a function (`log_request`, below; the README defines it in init_by_lua) (counter inc by host and status, histogram observe by host of the request time, 19 buckets; label values as arguments)',
    vars_inline => 'vars with the reads in the log_by_lua_block itself (interpreted: LuaJIT starts no trace in a chunk)',
    readme_inline => 'readme with the code in the log_by_lua_block itself',
    readme_module => 'same metrics recorded by ngx_http_shmprom_module\'s directives (README, "Without Lua in the log phase"): `shmprom_inc` by host and status, `shmprom_observe` of `$request_time` by host; no Lua in the log phase',
    vars_ngxvar => 'same + log_by_lua doing nginx-lua-prometheus\'s README reads (`ngx.var.server_name` twice, `.status`, `.request_time`), recording nothing',
    readme_ngxvar => 'same + those four `ngx.var` reads and the same two metric calls with shmprom',
    peer_readme => 'same + nginx-lua-prometheus\'s README example (PEER_LUA_PATH): the four `ngx.var` reads and the two calls',
);
my @CONFIGS = qw(plain vars readme vars_inline readme_inline readme_module vars_ngxvar readme_ngxvar);
push @CONFIGS, 'peer_readme' if $PEER;

sub micro {
    my @ports = free_ports(scalar @CONFIGS);
    my %port;
    @port{@CONFIGS} = @ports;
    my $servers = '';
    for my $c (@CONFIGS) {
        $servers .= <<"EOS";
    server {
        listen 127.0.0.1:$port{$c};
        server_name bench;
        location / { return 200 "hello\\n"; }
$LOG{$c}    }
EOS
    }
    my $peer_http = $PEER ? 'lua_shared_dict peer_metrics 16m;' : '';
    my $peer_init = $PEER ? <<"EOL" : '';
        peer_prom = require("prometheus").init("peer_metrics")
        peer_requests, peer_latency = require("shmprom_bench.readme").metrics(peer_prom)
EOL
    my ($mport) = free_ports(1);
    my $module = shmprom_module();
    my $conf = conf_head(workers => 2, conns => 1024, temp => 1, modules => [$module]) . <<"EOC";
    $peer_http
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "bench_b", size = "16m" }
        metric_requests, metric_latency, log_request, log_vars =
            require("shmprom_bench.readme").setup(metrics)
    }
    init_worker_by_lua_block {
        metrics:init_worker()
$peer_init
    }
$servers
    server {
        listen 127.0.0.1:$mport;
        location = /metrics { content_by_lua_block { metrics:collect() } }
        location = /peer { content_by_lua_block { peer_prom:collect() } }
    }
}
EOC
    my $nx = nginx_start(name => 'b-micro', conf => $conf,
                         ready => "http://127.0.0.1:$mport/metrics", workers => 2);
    my @w = @{ $nx->{workers} };
    for my $c (@CONFIGS) {
        my ($code) = http_get("http://127.0.0.1:$port{$c}/", 5);
        die "config $c answers $code\n" unless $code eq '200';
        wrk_run(url => "http://127.0.0.1:$port{$c}/", @WRK, secs => $WARM);
    }
    my %runs;
    for my $r (0 .. $ROUNDS - 1) {
        my @order = (@CONFIGS[$r % @CONFIGS .. $#CONFIGS], @CONFIGS[0 .. $r % @CONFIGS - 1]);
        for my $c (@order) {
            my $res = wrk_run(url => "http://127.0.0.1:$port{$c}/", @WRK, workers => \@w);
            logmsg sprintf('(b) round %d %-11s %8.0f req/s %6.1f us CPU/req', $r + 1, $c,
                           $res->{rps}, $res->{cpu_us_per_req});
            $runs{$c}[$r] = $res;
        }
    }
    my (undef, undef, undef, $m) = http_get("http://127.0.0.1:$mport/metrics", 30);
    nginx_stop($nx);
    my $counted = 0;
    $counted += $1 while $m =~ /^nginx_http_requests_total\{[^}]*\} (\S+)$/mg;
    return (\%runs, $counted, \%port);
}

sub ratio_rows {
    my ($runs, $pairs) = @_;
    my @rows;
    for my $p (@$pairs) {
        my ($x, $base, $target_rps, $target_cpu) = @$p;
        my (@rr, @cr);
        for my $r (0 .. $ROUNDS - 1) {
            my $a = $runs->{$x}[$r];
            my $b = $runs->{$base}[$r];
            push @rr, $a->{rps} / $b->{rps};
            push @cr, $b->{cpu_us_per_req} / $a->{cpu_us_per_req};
        }
        my $mr = median(@rr);
        my $mc = median(@cr);
        my ($lo, $hi) = minmax(@rr);
        my $verdict = '';
        if (defined $target_rps) {
            $verdict = sprintf('>= %.2f: %s', $target_rps, $mr >= $target_rps ? 'met'
                : sprintf('MISSED by %.3f', $target_rps - $mr));
        }
        my $cverdict = '';
        if (defined $target_cpu) {
            $cverdict = sprintf('>= %.2f: %s', $target_cpu, $mc >= $target_cpu ? 'met'
                : sprintf('MISSED by %.3f', $target_cpu - $mc));
        }
        push @rows, [ "$x vs $base", sprintf('%.3f', $mr), sprintf('%.3f .. %.3f', $lo, $hi),
                      $verdict, sprintf('%.3f', $mc), $cverdict ];
        if (defined $target_rps) {
            add_target("b-$x-$base-rps", "(b) $x vs $base: req/s", sprintf('>= %.2f', $target_rps),
                       sprintf('%.3f (median of %d paired runs; range %.3f .. %.3f)', $mr, $ROUNDS, $lo, $hi),
                       $verdict =~ s/^>= [\d.]+: //r);
        }
        if (defined $target_cpu) {
            add_target("b-$x-$base-cpu", "(b) $x vs $base: CPU per request (baseline / config)",
                       sprintf('>= %.2f', $target_cpu), sprintf('%.3f', $mc), $cverdict =~ s/^>= [\d.]+: //r);
        }
    }
    return @rows;
}

sub per_config_rows {
    my ($runs, $names, $desc) = @_;
    my @rows;
    for my $c (@$names) {
        my @rps = map { $_->{rps} } @{ $runs->{$c} };
        my @cpu = map { $_->{cpu_us_per_req} } @{ $runs->{$c} };
        my @p99 = map { $_->{p99} } @{ $runs->{$c} };
        my ($lo, $hi) = minmax(@rps);
        my $err = 0;
        $err += $_->{errors} + $_->{non2xx} for @{ $runs->{$c} };
        push @rows, [ $c, $desc->{$c}, fmt_num(median(@rps)), fmt_num($lo) . ' .. ' . fmt_num($hi),
                      sprintf('%.1f', median(@cpu)),
                      defined $p99[0] ? sprintf('%.2f', 1000 * median(@p99)) : 'n/a', $err ];
    }
    return @rows;
}

# ------------------------------------------------------------------ gateway

sub gateway {
    my ($gwa, $meta, $gwb, $metb, $gwc, $metc, @nodes) = free_ports(9);
    my $var = "$WORK/b-gateway";
    my %env = (GATEWAY_PORT => $gwa, METRICS_PORT => $meta, NODE_PORTS => "@nodes",
               VAR_DIR => $var, RECORDER => 'module');
    my $envs = join ' ', map { "$_='$env{$_}'" } sort keys %env;
    (my $start_cmd = "$envs scripts/run-gateway.sh start") =~ s/\Q$WORK\E/\$BENCH_WORK/g;
    logmsg "starting the gateway: $start_cmd";
    # the gateway loads the repository's library, not the run's snapshot
    my $same_lib = 1;
    if ($ENV{BENCH_SNAP}) {
        my ($a) = split ' ', `sha256sum $REPO/target/release/libshmprom.so`;
        my ($b) = split ' ', `sha256sum $ENV{BENCH_SNAP}/lib/libshmprom.so`;
        $same_lib = ($a // '') eq ($b // '');
    }
    my $rc = system("cd $REPO && env $envs scripts/run-gateway.sh start >$WORK/b-gateway-start.log 2>&1");
    my $stop = sub { system("cd $REPO && env $envs scripts/run-gateway.sh stop >>$WORK/b-gateway-start.log 2>&1") };
    if ($rc != 0) {
        $stop->();
        die "run-gateway.sh start failed:\n" . (slurp("$WORK/b-gateway-start.log") // '') . "\n";
    }
    my @started;
    my %res = eval {
        my ($gpid) = (slurp("$var/pids") // '') =~ /^gateway (\d+)$/m;
        die "no gateway pid in $var/pids\n" unless $gpid;
        my @wa = worker_pids($gpid);
        # The same rendered config with the module's two lines (load_module,
        # shmprom_gateway on) removed: no metrics; or replaced by the preset's
        # Lua phase handlers. Own ports, pid, logs and temp paths.
        my $conf = slurp("$var/conf/gateway.conf");
        my $LOAD = qr{^\s*load_module \S*ngx_http_shmprom_module\.so;\s*\n}m;
        my $ON = qr{^(\s*)shmprom_gateway on;\s*\n}m;
        my @removed;
        for my $re ($LOAD, $ON) {
            die "no line matching $re in the rendered gateway.conf\n" unless $conf =~ $re;
            (my $l = $&) =~ s/^\s+|\s+$//g;
            push @removed, $l;
        }
        my $variant = sub {
            my ($name, $port, $metport, $with) = @_;
            my $c = $conf;
            $c =~ s/$LOAD//;
            $c =~ s/$ON/$with ? "$1$with\n" : ''/e;
            $c =~ s/127\.0\.0\.1:$gwa;/127.0.0.1:$port;/ or die "no gateway listen line\n";
            $c =~ s/127\.0\.0\.1:$meta;/127.0.0.1:$metport;/ or die "no metrics listen line\n";
            $c =~ s{\Q$var\E/gateway/}{\$PREFIX/gw/}g;
            $c =~ s{\Q$var\E/logs/gateway\.}{\$PREFIX/logs/gateway-$name.}g;
            mkdir "$WORK/b-gateway-$name";
            mkdir "$WORK/b-gateway-$name/gw";
            my $n = nginx_start(name => "b-gateway-$name", conf => $c,
                                ready => "http://127.0.0.1:$metport/metrics", workers => 2);
            push @started, $n;
            return $n;
        };
        my $nb = $variant->('nometrics', $gwb, $metb, '');
        my $LUA = 'set_by_lua_block $dfs_gateway_begun { return gateway.begin() } '
                . 'log_by_lua_block { gateway.log() }';
        my $nc = $variant->('lua', $gwc, $metc, $LUA);
        my @wb = @{ $nb->{workers} };
        my @wc = @{ $nc->{workers} };
        # a small file on the storage nodes
        spew("$var/data/bench-1k.bin", 'x' x 1024);
        my %url = (gateway => "http://127.0.0.1:$gwa/bench-1k.bin",
                   gateway_nometrics => "http://127.0.0.1:$gwb/bench-1k.bin",
                   gateway_lua => "http://127.0.0.1:$gwc/bench-1k.bin");
        my %w = (gateway => \@wa, gateway_nometrics => \@wb, gateway_lua => \@wc);
        my @cfg = qw(gateway gateway_nometrics gateway_lua);
        for my $c (@cfg) {
            my ($code, undef, $size) = http_get($url{$c}, 5);
            die "$c: GET answers $code ($size bytes)\n" unless $code eq '200' && $size == 1024;
            wrk_run(url => $url{$c}, @WRK, secs => $WARM);
        }
        my (undef, undef, undef, $m0) = http_get("http://127.0.0.1:$meta/metrics", 30);
        my %runs;
        my $sent = 0;
        for my $r (0 .. $ROUNDS - 1) {
            my @order = map { $cfg[($r + $_) % 3] } 0 .. 2;
            for my $c (@order) {
                my $res = wrk_run(url => $url{$c}, @WRK, workers => $w{$c});
                logmsg sprintf('(b) round %d %-17s %8.0f req/s %6.1f us CPU/req', $r + 1, $c,
                               $res->{rps}, $res->{cpu_us_per_req});
                $runs{$c}[$r] = $res;
            }
        }
        sleep 1;
        my (undef, undef, undef, $m1) = http_get("http://127.0.0.1:$meta/metrics", 30);
        my $reads = sub {
            my ($m) = @_;
            my $n = 0;
            $n += $1 while $m =~ /^dfs_gateway_requests_total\{op="read",status="200"\} (\S+)$/mg;
            return $n;
        };
        my $wrk_total = 0;
        $wrk_total += $_->{requests} for @{ $runs{gateway} };
        nginx_stop($_) for splice @started;
        (runs => \%runs, removed => \@removed, counted => $reads->($m1) - $reads->($m0),
         wrk_total => $wrk_total, start_cmd => $start_cmd, same_lib => $same_lib);
    };
    my $err = $@;
    nginx_stop($_) for @started;
    $stop->();
    die $err if $err;
    return \%res;
}

# ------------------------------------------------------------------ diagnostic

# What the log phase spends, piece by piece, timed inside log_by_lua by the
# worker's CPU clock on proxied requests (1 worker): the README's variable
# reads and its two metric calls, the gateway preset's 7 variable reads,
# and the same 7 values read through one map variable and split in Lua.
sub diag {
    my ($port, $bport, $mport) = free_ports(3);
    my $conf = conf_head(workers => 1, conns => 1024, temp => 1) . <<"EOC";
    map \$request_method \$bench_log_vars {
        default "\$request_length \$bytes_sent \$request_completion \$body_bytes_sent \$upstream_addr|\$upstream_status|\$upstream_response_time";
    }
    upstream bench_be { server 127.0.0.1:$bport; keepalive 16; }
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        metrics = shmprom.new{ zone = "bench_b_diag", size = "16m" }
        metric_requests, metric_latency = require("shmprom_bench.readme").setup(metrics)
        ST = { n = 0, clock = 0, readme_vars = 0, readme_record = 0,
               readme_args = 0, preset_vars = 0, map_parse = 0 }
        local find, sub = string.find, string.sub
        function split7(s)
            local a = find(s, " ", 1, true)
            local b = find(s, " ", a + 1, true)
            local c = find(s, " ", b + 1, true)
            local d = find(s, " ", c + 1, true)
            local e = find(s, "|", d + 1, true)
            local f = find(s, "|", e + 1, true)
            return tonumber(sub(s, 1, a - 1)), tonumber(sub(s, a + 1, b - 1)),
                   sub(s, b + 1, c - 1), tonumber(sub(s, c + 1, d - 1)),
                   sub(s, d + 1, e - 1), sub(s, e + 1, f - 1), sub(s, f + 1)
        end
    }
    init_worker_by_lua_block { metrics:init_worker() }
    server {
        listen 127.0.0.1:$bport;
        location / { return 200 "hello\\n"; }
    }
    server {
        listen 127.0.0.1:$port;
        server_name bench;
        location / {
            proxy_pass http://bench_be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        log_by_lua_block {
            local now = require("shmprom_bench.fill").cpu_ns
            local var = ngx.var
            local t0 = now()
            local t1 = now()
            local host, status = var.server_name, var.status
            local rt, host2 = tonumber(var.request_time), var.server_name
            local t2 = now()
            -- the two shapes of the calls, in turns first and second
            local tab, arg
            if ST.n % 2 == 0 then
                metric_requests:inc(1, {host, status})
                metric_latency:observe(rt, {host2})
                local m = now()
                metric_requests:inc(1, host, status)
                metric_latency:observe(rt, host2)
                local e = now()
                tab, arg = m - t2, e - m
            else
                metric_requests:inc(1, host, status)
                metric_latency:observe(rt, host2)
                local m = now()
                metric_requests:inc(1, {host, status})
                metric_latency:observe(rt, {host2})
                local e = now()
                arg, tab = m - t2, e - m
            end
            local t3 = now()
            local a, b = tonumber(var.request_length), tonumber(var.bytes_sent)
            local c, d = var.request_completion, tonumber(var.body_bytes_sent)
            local e, f, g = var.upstream_addr, var.upstream_status,
                            var.upstream_response_time
            local t4 = now()
            local a2, b2, c2, d2, e2, f2, g2 = split7(var.bench_log_vars)
            local t5 = now()
            if a ~= a2 or e ~= e2 or g ~= g2 then
                ngx.log(ngx.ERR, "map parse differs: ", e, " ", e2)
            end
            ST.n = ST.n + 1
            ST.clock = ST.clock + (t1 - t0)
            ST.readme_vars = ST.readme_vars + (t2 - t1)
            ST.readme_record = ST.readme_record + tab
            ST.readme_args = ST.readme_args + arg
            ST.preset_vars = ST.preset_vars + (t4 - t3)
            ST.map_parse = ST.map_parse + (t5 - t4)
        }
    }
    server {
        listen 127.0.0.1:$mport;
        location / {
            content_by_lua_block {
                ngx.say(require("shmprom_bench.json").encode(ST))
            }
        }
    }
}
EOC
    my $nx = nginx_start(name => 'b-diag', conf => $conf, ready => "http://127.0.0.1:$mport/",
                         workers => 1);
    my $res = wrk_run(url => "http://127.0.0.1:$port/", threads => 2, conns => 50,
                      secs => $QUICK ? 2 : 5);
    my $st = Bench::http_get_json("http://127.0.0.1:$mport/");
    nginx_stop($nx);
    my %ns;
    for my $k (qw(readme_vars readme_record readme_args preset_vars map_parse)) {
        $ns{$k} = ($st->{$k} - $st->{clock}) / $st->{n};
    }
    $ns{clock} = $st->{clock} / $st->{n};
    $ns{n} = $st->{n};
    return \%ns;
}

# ------------------------------------------------------------------ report

my $md = "## (b) End to end with wrk on loopback\n\n";
my %summary;

if ($only eq 'all' || $only eq 'micro') {
    my ($runs, $counted, $port) = micro();
    my $wrk_cmd = $runs->{plain}[0]{cmd};
    $wrk_cmd =~ s/:\d+\//:PORT\//;
    my $total = 0;
    $total += $_->{requests} for map { @{ $runs->{$_} } } qw(readme readme_inline readme_module readme_ngxvar);
    $md .= "### README example\n\n";
    $md .= "One nginx, 2 workers, `access_log off`, ngx_http_shmprom_module loaded (its "
         . "log-phase and post-read handlers return at once where no directive of it is "
         . "set), one server per config (same content "
         . "handler `return 200 \"hello\\n\"`, `server_name bench`); command per run: `$wrk_cmd` "
         . "against one port at a time; $ROUNDS rounds, configs in a rotated order each round, "
         . "one ${WARM}s warm-up run per config first. CPU/req = utime+stime of the 2 worker "
         . "pids (/proc/PID/stat) over the run / requests wrk completed. Medians over rounds.\n\n";
    $md .= md_table([ 'config', 'what', 'req/s (median)', 'req/s range', 'worker CPU us/req',
                      'p99 ms', 'errors' ], per_config_rows($runs, \@CONFIGS, \%DESC));
    $md .= "\nRatios (per round against the baseline of the same round, median; CPU ratio = "
         . "baseline CPU/req / config CPU/req, so 1.00 = no extra CPU):\n\n";
    my @pairs = ([ 'readme', 'vars', 0.98 ], [ 'readme', 'plain', 0.87 ], [ 'vars', 'plain' ],
                 [ 'readme_module', 'plain', 0.87 ],
                 [ 'readme_inline', 'vars_inline' ], [ 'readme_inline', 'plain' ],
                 [ 'vars_inline', 'plain' ], [ 'readme', 'readme_inline' ],
                 [ 'readme_ngxvar', 'vars_ngxvar' ], [ 'readme_ngxvar', 'plain' ],
                 [ 'vars_ngxvar', 'plain' ]);
    push @pairs, [ 'peer_readme', 'vars_ngxvar' ], [ 'peer_readme', 'plain' ],
        [ 'readme_ngxvar', 'peer_readme' ] if $PEER;
    my @rr = ratio_rows($runs, \@pairs);
    $md .= md_table([ 'pair', 'req/s ratio', 'range', 'target', 'CPU/req ratio', 'CPU target' ], @rr);
    for (@rr) { $summary{$_->[0]} = $_->[1] }
    $md .= "\nThe shmprom counter `nginx_http_requests_total` holds " . fmt_num($counted, 9)
         . " requests; wrk completed " . fmt_num($total, 9) . " on the readme, readme_inline, readme_module and readme_ngxvar ports "
         . "(the difference is the warm-up runs and requests in flight when wrk stops).\n\n";
    $md .= "Log-phase code of each config:\n\n";
    for my $c (@CONFIGS) {
        next unless $LOG{$c};
        $md .= "- $c:\n\n```nginx\n$LOG{$c}```\n\n";
    }
    $md .= "The metrics and the functions `log_request` and `log_vars` "
         . "(bench/lua/shmprom_bench/readme.lua, `setup(metrics)` in init_by_lua):\n\n```lua\n"
         . slurp($README_LUA) . "```\n\n";
    if (!$PEER) {
        $md .= "Peer (nginx-lua-prometheus) **from anchors.md, not measured here**: its README "
             . "example costs 16-19% of a plain nginx's req/s (0.81 of plain, 0.92 of the "
             . "variable reads alone, measured on this machine on other days).\n\n";
    }
}

if ($only eq 'all' || $only eq 'micro' || $only eq 'diag') {
    my $d = diag();
    $md .= "### Where the log phase's time goes (diagnostic)\n\n";
    $md .= "One nginx, 1 worker, proxying to a second server of its own; wrk -t2 -c50 for "
         . ($QUICK ? 2 : 5) . " s; inside log_by_lua every piece is timed by the worker's "
         . "thread CPU clock (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)` through FFI, its own "
         . sprintf('cost of %.0f ns per reading taken off), averaged over %s requests:',
                   $d->{clock}, fmt_num($d->{n})) . "\n\n";
    $md .= md_table([ 'piece of the log phase', 'ns per request' ],
        [ "nginx-lua-prometheus's README's 4 variable reads (`ngx.var.server_name` x2, `.status`, `.request_time`)", fmt_num($d->{readme_vars}) ],
        [ "2 metric calls with label tables built per call (`inc(1, {host, status})`, `observe(rt, {host})`: nginx-lua-prometheus's shape)", fmt_num($d->{readme_record}) ],
        [ "the same 2 calls with the label values as arguments (`inc(1, host, status)`, `observe(rt, host)`: the README's shape)", fmt_num($d->{readme_args}) ],
        [ "7 separate variable reads on a proxied GET (`request_length`, `bytes_sent`, `request_completion`, `body_bytes_sent`, `upstream_addr`, `upstream_status`, `upstream_response_time`)", fmt_num($d->{preset_vars}) ],
        [ "the same 7 values through one `map` variable (`\$bench_log_vars`) split in Lua", fmt_num($d->{map_parse}) ]);
    $md .= sprintf("\nPer variable read: %.0f ns in the README group, %.0f ns in the group of 7. A "
         . "read costs ~0.1 us when LuaJIT runs it inside a compiled trace and ~0.7-1 us when it "
         . "runs in the interpreter (an FFI round trip through lua-resty-core), and which one "
         . "happens depends on the traces LuaJIT manages to form around the chunk: with this "
         . "build, traces that start inside lua-resty-core's var.lua abort with \"NYI: return to "
         . "lower frame\", and a trace through the wrapper aborts on an inner loop (\"inner loop "
         . "in root trace\" at the histogram's bucket search), as `jit.v` shows.\n\n",
         $d->{readme_vars} / 4, $d->{preset_vars} / 7);
    $summary{diag} = $d;
}

if ($only eq 'all' || $only eq 'gateway') {
    my $g = gateway();
    my $runs = $g->{runs};
    my $wrk_cmd = $runs->{gateway}[0]{cmd};
    $wrk_cmd =~ s/:\d+\//:PORT\//;
    $md .= "### Gateway preset\n\n";
    $md .= "`$g->{start_cmd}` (free ports, scratch VAR_DIR: 3 storage nodes with 1 worker each, "
         . "the gateway with 2 workers, the preset recorded by ngx_http_shmprom_module). Two more "
         . "gateways run the same rendered config with these lines removed: `"
         . join('`, `', @{ $g->{removed} }) . "`: `gateway_nometrics` records nothing, "
         . "`gateway_lua` has the preset's Lua phase handlers in their place (`set_by_lua_block "
         . "\$dfs_gateway_begun { return gateway.begin() }`, `log_by_lua_block { gateway.log() }`) "
         . "(own ports, pid, logs and temp paths; the probes of the nodes and /metrics stay). "
         . "All proxy to the same nodes. Command per run: `$wrk_cmd` (a 1 KiB file), "
         . "$ROUNDS rounds rotating the three, one ${WARM}s warm-up each. CPU/req = the "
         . "gateway's 2 worker pids only.\n\n";
    my %gdesc = (gateway => 'gateway preset, recorded by the nginx module',
                 gateway_lua => 'gateway preset, recorded by the Lua phase handlers',
                 gateway_nometrics => 'same config, no metrics');
    my @gcfg = qw(gateway gateway_lua gateway_nometrics);
    $md .= md_table([ 'config', 'what', 'req/s (median)', 'req/s range', 'worker CPU us/req',
                      'p99 ms', 'errors' ], per_config_rows($runs, \@gcfg, \%gdesc));
    $md .= "\n";
    $md .= "Ratios: per round against the no-metrics gateway's run of the same round, median "
         . "of the rounds (so not the ratio of the medians above); CPU ratio = no-metrics "
         . "CPU/req / preset CPU/req.\n\n";
    my @rr = ratio_rows($runs, [ [ 'gateway', 'gateway_nometrics', 0.95, 0.95 ],
                                 [ 'gateway_lua', 'gateway_nometrics', undef, undef ] ]);
    $md .= md_table([ 'pair', 'req/s ratio', 'range', 'target', 'CPU/req ratio', 'CPU target' ], @rr);
    $summary{$_->[0]} = $_->[1] for @rr;
    $summary{'gateway vs gateway_nometrics cpu'} = $rr[0][4];
    $md .= "\n**The repository's library differed from the run's snapshot when the gateways "
         . "started: these gateways ran another build than the other benchmarks.**\n"
        unless $g->{same_lib};
    $md .= "\nThe preset counted " . fmt_num($g->{counted}, 9) . " `dfs_gateway_requests_total"
         . "{op=\"read\",status=\"200\"}` during the timed runs; wrk completed "
         . fmt_num($g->{wrk_total}, 9) . " (the rest: requests in flight when wrk stops).\n\n";
}

write_fragment('b', $md);
