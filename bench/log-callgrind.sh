#!/usr/bin/env bash
# bench/log-callgrind.sh: user-space instructions per request of (b)'s
# README configurations, counted by callgrind: a plain nginx, the README
# example's log code written inline in log_by_lua_block (interpreted) and
# as a function defined in init_by_lua (compiled by LuaJIT), each with and
# without the two metric updates, and the same metrics recorded by
# ngx_http_shmprom_module's directives. A diagnostic beside (b): instruction
# counts do not depend on the machine's load, wall-clock figures do. Not
# part of run-all.sh; writes nothing into the repository.
#
#   bench/log-callgrind.sh [REQUESTS]        (default 3000)
#
# Each variant runs in its own single-process nginx (master_process off,
# access_log off) under valgrind --tool=callgrind; curl sends 1000 GETs
# over one keepalive connection to warm up (LuaJIT compiles what it will),
# the counters are zeroed (callgrind_control -z), REQUESTS more GETs
# follow, and the counters are dumped (callgrind_control -d).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-3000}
for t in valgrind callgrind_control curl perl nginx; do
    command -v "$t" >/dev/null || { echo "log-callgrind: $t is missing" >&2; exit 1; }
done
for f in target/release/libshmprom.so target/release/ngx_http_shmprom_module.so; do
    [[ -f $REPO/$f ]] || { echo "log-callgrind: $f is missing (make build)" >&2; exit 1; }
done
W=$(mktemp -d /tmp/shmprom-logcg.XXXXXX)
cleanup() { [[ -n ${KEEP:-} ]] || rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/logs"
free_port() { perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen=>1,LocalAddr=>"127.0.0.1",LocalPort=>0)->sockport'; }
user=
[[ $(id -u) == 0 ]] && user='user root root;'

# the log phase of each variant
log_code() {
    case $1 in
        plain) ;;
        vars_inline) echo 'log_by_lua_block { local host = ngx.var.host; local status, rt = ngx.status, ngx.now() - ngx.req.start_time() }' ;;
        readme_inline) echo 'log_by_lua_block { local host = ngx.var.host; metric_requests:inc(1, host, ngx.status); metric_latency:observe(ngx.now() - ngx.req.start_time(), host) }' ;;
        vars) echo 'log_by_lua_block { log_vars() }' ;;
        readme) echo 'log_by_lua_block { log_request() }' ;;
        module) echo 'shmprom_inc nginx_http_requests_total host=$host status=$status; shmprom_observe nginx_http_request_duration_seconds $request_time host=$host;' ;;
    esac
}

conf() { # variant port
    cat <<EOF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
load_module $REPO/target/release/ngx_http_shmprom_module.so;
$user
master_process off;
daemon off;
worker_processes 1;
pid $W/nginx-$1.pid;
error_log $W/logs/$1.err notice;
events { worker_connections 64; }
http {
    access_log off;
    lua_package_path "$REPO/lua/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_package_cpath "$REPO/target/release/?.so;;";
    client_body_temp_path $W/body;
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "logcg", size = "16m" }
        metric_requests = metrics:counter("nginx_http_requests_total",
            "Requests", {"host", "status"})
        metric_latency = metrics:histogram("nginx_http_request_duration_seconds",
            "Latency", {"host"}, { 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
            0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 10 })
        local requests, latency = metric_requests, metric_latency
        function log_request()
            local host = ngx.var.host
            requests:inc(1, host, ngx.status)
            latency:observe(ngx.now() - ngx.req.start_time(), host)
        end
        function log_vars()
            local host = ngx.var.host
            local status, rt = ngx.status, ngx.now() - ngx.req.start_time()
            last_host, last_status, last_rt = host, status, rt
        end
    }
    init_worker_by_lua_block { metrics:init_worker() }
    server {
        listen 127.0.0.1:$2;
        server_name bench;
        location / { return 200 "hello\n"; }
        $(log_code "$1")
    }
}
EOF
}

urls() { # port count
    local i; for ((i = 0; i < $2; i++)); do printf 'url = "http://127.0.0.1:%s/"\noutput = /dev/null\n' "$1"; done
}

declare -A IR
for v in plain vars_inline readme_inline vars readme module; do
    port=$(free_port)
    conf "$v" "$port" >"$W/$v.conf"
    valgrind --tool=callgrind --callgrind-out-file="$W/cg.$v" nginx -p "$W/" \
        -c "$W/$v.conf" >"$W/vg-$v.log" 2>&1 &
    vpid=$!
    up=
    for _ in $(seq 1 150); do
        if curl -s -o /dev/null "http://127.0.0.1:$port/"; then up=1; break; fi
        sleep 0.2
    done
    [[ -n $up ]] || { echo "log-callgrind: $v did not start:" >&2; tail -5 "$W/vg-$v.log" "$W/logs/$v.err" >&2; kill "$vpid"; exit 1; }
    urls "$port" 1000 >"$W/warm"; curl -s -K "$W/warm"
    callgrind_control -z "$vpid" >/dev/null 2>&1
    urls "$port" "$N" >"$W/timed"; curl -s -K "$W/timed"
    callgrind_control -d "$vpid" >/dev/null 2>&1
    kill "$vpid"; wait "$vpid" 2>/dev/null || true
    f=$(ls -t "$W"/cg."$v".* | head -n 1)
    ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$f")
    IR[$v]=$ir
    printf '%-14s %12s instructions / %d GETs = %6d per request (+%d over plain)\n' \
        "$v" "$ir" "$N" $((ir / N)) $(((ir - ${IR[plain]}) / N))
done
