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
# access_log off), counted by bench/lib/callgrind.sh's cg_count (1000
# warm-up GETs over one keepalive connection, then REQUESTS counted ones);
# the metrics and log functions are (b)'s, bench/lua/shmprom_bench/readme.lua.
# The `*_ngxvar` variants are (b)'s rows of the same names, nginx-lua-
# prometheus's README code shape (four `ngx.var` reads, label values in a
# table built per call, inline); with PEER_LUA_PATH naming a checkout of
# nginx-lua-prometheus, `peer_readme` runs that code with the peer.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-3000}
for t in valgrind callgrind_control curl perl nginx; do
    command -v "$t" >/dev/null || { echo "log-callgrind: $t is missing" >&2; exit 1; }
done
for f in target/release/libshmprom.so target/release/ngx_http_shmprom_module.so; do
    [[ -f $REPO/$f ]] || { echo "log-callgrind: $f is missing (make build)" >&2; exit 1; }
done
# shellcheck source=lib/callgrind.sh
. "$REPO/bench/lib/callgrind.sh"
cg_init logcg

# the log phase of each variant
log_code() {
    case $1 in
        plain) ;;
        vars_inline) echo 'log_by_lua_block { local host = ngx.var.host; local status, rt = ngx.status, ngx.now() - ngx.req.start_time() }' ;;
        readme_inline) echo 'log_by_lua_block { local host = ngx.var.host; metric_requests:inc(1, host, ngx.status); metric_latency:observe(ngx.now() - ngx.req.start_time(), host) }' ;;
        vars) echo 'log_by_lua_block { log_vars() }' ;;
        readme) echo 'log_by_lua_block { log_request() }' ;;
        module) echo 'shmprom_inc nginx_http_requests_total host=$host status=$status; shmprom_observe nginx_http_request_duration_seconds $request_time host=$host;' ;;
        vars_ngxvar) echo 'log_by_lua_block { local host, status = ngx.var.server_name, ngx.var.status; local rt, host2 = tonumber(ngx.var.request_time), ngx.var.server_name }' ;;
        readme_ngxvar) echo 'log_by_lua_block { metric_requests:inc(1, {ngx.var.server_name, ngx.var.status}); metric_latency:observe(tonumber(ngx.var.request_time), {ngx.var.server_name}) }' ;;
        peer_readme) echo 'log_by_lua_block { peer_requests:inc(1, {ngx.var.server_name, ngx.var.status}); peer_latency:observe(tonumber(ngx.var.request_time), {ngx.var.server_name}) }' ;;
    esac
}

PEER=${PEER_LUA_PATH:-}
PEER_PATH= PEER_HTTP= PEER_INIT=
if [[ -n $PEER ]]; then
    [[ -f $PEER/prometheus.lua ]] || { echo "log-callgrind: no prometheus.lua in $PEER" >&2; exit 1; }
    PEER_PATH="$PEER/?.lua;"
    PEER_HTTP='lua_shared_dict peer_metrics 16m;'
    # the peer's metrics as bench (b) defines them
    PEER_INIT='peer_prom = require("prometheus").init("peer_metrics")
        peer_requests, peer_latency = require("shmprom_bench.readme").metrics(peer_prom)'
fi

conf() { # variant port
    cg_conf_head "$1" "load_module $REPO/target/release/ngx_http_shmprom_module.so;"
    cat <<EOF
    $PEER_HTTP
    lua_package_path "$REPO/lua/?.lua;$REPO/bench/lua/?.lua;$PEER_PATH/usr/share/lua/5.1/?.lua;;";
    lua_package_cpath "$REPO/target/release/?.so;;";
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "logcg", size = "16m" }
        -- the metrics and log functions of bench (b)
        metric_requests, metric_latency, log_request, log_vars =
            require("shmprom_bench.readme").setup(metrics)
    }
    init_worker_by_lua_block {
        metrics:init_worker()
        $PEER_INIT
    }
    server {
        listen 127.0.0.1:$2;
        server_name bench;
        location / { return 200 "hello\n"; }
        $(log_code "$1")
    }
}
EOF
}

declare -A IR
VARIANTS=(plain vars_inline readme_inline vars readme module vars_ngxvar readme_ngxvar)
[[ -n $PEER ]] && VARIANTS+=(peer_readme)
for v in "${VARIANTS[@]}"; do
    port=$(free_port)
    conf "$v" "$port" >"$W/$v.conf"
    ir=$(cg_count "$v" "http://127.0.0.1:$port/" "$N" "$W/logs/$v.err" -- \
        -p "$W/" -c "$W/$v.conf") || exit 1
    IR[$v]=$ir
    printf '%-14s %12s instructions / %d GETs = %6d per request (+%d over plain)\n' \
        "$v" "$ir" "$N" $((ir / N)) $(((ir - ${IR[plain]}) / N))
done
