#!/usr/bin/env bash
# scripts/run-gateway.sh: the embedded default of shmprom (`make run`).
#
# Starts three storage nodes (stateless WebDAV servers, nginx dav + dav_ext,
# over one shared data directory) and the gateway nginx in front of them
# (resty.shmprom.gateway preset, /metrics on its own listener). Everything it
# writes stays under VAR_DIR (default <repo>/var).
#
#   scripts/run-gateway.sh [run]       start, print the URLs, wait; Ctrl-C or
#                                      TERM stops every process it started
#   scripts/run-gateway.sh start       start in the background (also
#                                      START_ONLY=1), write VAR_DIR/pids,
#                                      return once everything accepts
#   scripts/run-gateway.sh stop        stop what VAR_DIR/pids lists
#   scripts/run-gateway.sh stop-node PORT | start-node PORT
#                                      stop / start one storage node
#   scripts/run-gateway.sh status      list the processes and whether they run
#
# Environment: GATEWAY_PORT (8080), METRICS_PORT (9145), NODE_PORTS
# ("8081 8082 8083"), VAR_DIR (<repo>/var), SHMPROM_NGINX or NGINX (the
# nginx binary, default nginx), START_TIMEOUT
# (seconds to wait for a listener, 15), STOP_TIMEOUT (seconds to wait for a
# process to exit before SIGKILL, 10), RECORDER ("module" when
# target/release/ngx_http_shmprom_module.so is built, else "lua": who records
# the gateway's requests, the nginx module or the preset's Lua phase
# handlers).
#
# VAR_DIR/pids has one "NAME PID" line per process: "node:PORT" for each
# storage node, "gateway" for the gateway (the nginx master pid).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAY_PORT=${GATEWAY_PORT:-8080}
METRICS_PORT=${METRICS_PORT:-9145}
NODE_PORTS=${NODE_PORTS:-"8081 8082 8083"}
VAR_DIR=${VAR_DIR:-$REPO/var}
# the nginx binary: SHMPROM_NGINX (as t/lib's harness; scripts/valgrind-check.sh
# points it at valgrind), else NGINX, else nginx. An exported NGINX is taken
# out of the environment nginx runs in: nginx reads that variable as the
# listening sockets handed over by a binary upgrade.
NGINX=${SHMPROM_NGINX:-${NGINX:-nginx}}
export -n NGINX 2>/dev/null || true
START_TIMEOUT=${START_TIMEOUT:-15}
STOP_TIMEOUT=${STOP_TIMEOUT:-10}
MODULE_SO=$REPO/target/release/ngx_http_shmprom_module.so
if [[ -z ${RECORDER:-} ]]; then
    if [[ -f $MODULE_SO ]]; then RECORDER=module; else RECORDER=lua; fi
fi
MODULES=/usr/lib/nginx/modules

die() { echo "run-gateway: $*" >&2; exit 1; }
say() { echo "run-gateway: $*" >&2; }

# ---------------------------------------------------------------- checks

check_port() {
    [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )) \
        || die "bad port \"$1\""
}

check_settings() {
    local p all=" "
    read -r -a NODES <<<"$NODE_PORTS"
    (( ${#NODES[@]} > 0 )) || die "NODE_PORTS is empty"
    for p in "$GATEWAY_PORT" "$METRICS_PORT" "${NODES[@]}"; do
        check_port "$p"
        [[ $all == *" $p "* ]] && die "port $p is given twice"
        all+="$p "
    done
    [[ $START_TIMEOUT =~ ^[0-9]+$ && $STOP_TIMEOUT =~ ^[0-9]+$ ]] \
        || die "START_TIMEOUT and STOP_TIMEOUT are whole seconds"
    [[ $VAR_DIR != *$'\n'* ]] || die "VAR_DIR has a newline"
    mkdir -p "$VAR_DIR"
    VAR_DIR=$(cd "$VAR_DIR" && pwd)
    PIDS_FILE=$VAR_DIR/pids
}

check_install() {
    command -v "$NGINX" >/dev/null \
        || die "no nginx (apt-get install nginx-core)"
    command -v curl >/dev/null || die "no curl (apt-get install curl)"
    local m
    for m in ndk_http_module ngx_http_lua_module ngx_http_dav_ext_module; do
        [[ -f $MODULES/$m.so ]] || die "missing $MODULES/$m.so" \
            "(apt-get install libnginx-mod-http-lua libnginx-mod-http-dav-ext)"
    done
    [[ -f $REPO/target/release/libshmprom.so ]] \
        || die "missing target/release/libshmprom.so: run 'make build' first"
}

# ---------------------------------------------------------------- pids file

# pid_of NAME: the pid recorded for NAME, or nothing
pid_of() {
    [[ -f $PIDS_FILE ]] || return 0
    awk -v n="$1" '$1 == n { print $2 }' "$PIDS_FILE" | tail -n 1
}

# record NAME PID (replaces an older line of NAME; PID "" removes it)
record() {
    local tmp=$PIDS_FILE.tmp.$$
    { [[ -f $PIDS_FILE ]] && awk -v n="$1" '$1 != n' "$PIDS_FILE"
      [[ -n $2 ]] && echo "$1 $2"; } >"$tmp" || true
    mv -f "$tmp" "$PIDS_FILE"
}

# ours PID NAME: PID runs an nginx this script started for NAME (guards
# against a stale pids file and a recycled pid)
ours() {
    local conf
    [[ -n $1 && -r /proc/$1/cmdline ]] || return 1
    case $2 in
        gateway) conf=$VAR_DIR/conf/gateway.conf ;;
        node:*) conf=$VAR_DIR/conf/node-${2#node:}.conf ;;
        *) return 1 ;;
    esac
    tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "-c $conf " 2>/dev/null
}

# ---------------------------------------------------------------- templates

sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

render() { # TEMPLATE OUT KEY=VALUE...
    local tpl=$1 out=$2 kv expr=()
    shift 2
    for kv in "$@"; do
        expr+=(-e "s|@${kv%%=*}@|$(sed_escape "${kv#*=}")|g")
    done
    sed "${expr[@]}" "$tpl" >"$out.tmp"
    if grep -q '@[A-Z_]*@' "$out.tmp"; then
        die "$out: placeholder left:" \
            "$(grep -o '@[A-Z_]*@' "$out.tmp" | head -n 1)"
    fi
    mv -f "$out.tmp" "$out"
}

user_directive() {
    if [[ $(id -u) == 0 ]]; then echo "user root;"; else echo ""; fi
}

prepare() {
    local p servers="" luanodes="" user
    user=$(user_directive)
    mkdir -p "$VAR_DIR"/{data,logs,conf,gateway}
    for p in "${NODES[@]}"; do
        mkdir -p "$VAR_DIR/nodes/$p"
        render "$REPO/nginx-conf/storage-node.conf" \
            "$VAR_DIR/conf/node-$p.conf" \
            NODE_PORT="$p" NODE_DIR="$VAR_DIR/nodes/$p" \
            DATA_DIR="$VAR_DIR/data" LOG_DIR="$VAR_DIR/logs" \
            USER_DIRECTIVE="$user"
        servers+="server 127.0.0.1:$p max_fails=1 fail_timeout=5s; "
        luanodes+="\"127.0.0.1:$p\", "
    done
    local load recorder
    case $RECORDER in
        module)
            [[ -f $MODULE_SO ]] || die "RECORDER=module: $MODULE_SO not built (make build)"
            load="load_module $MODULE_SO;"
            recorder="shmprom_gateway on;"
            ;;
        lua)
            load="# ngx_http_shmprom_module not loaded: the Lua phase handlers record"
            recorder='set_by_lua_block $dfs_gateway_begun { return gateway.begin() } log_by_lua_block { gateway.log() }'
            ;;
        *) die "RECORDER must be module or lua, not \"$RECORDER\"" ;;
    esac
    render "$REPO/nginx-conf/gateway.conf" "$VAR_DIR/conf/gateway.conf" \
        REPO="$REPO" VAR_DIR="$VAR_DIR" GATEWAY_PORT="$GATEWAY_PORT" \
        METRICS_PORT="$METRICS_PORT" UPSTREAM_SERVERS="$servers" \
        LUA_NODES="$luanodes" USER_DIRECTIVE="$user" \
        LOAD_SHMPROM_MODULE="$load" GATEWAY_RECORDER="$recorder"
}

# ---------------------------------------------------------------- processes

# accepting PORT: something answers TCP connects on 127.0.0.1:PORT
accepting() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# http_code URL [curl args]: the HTTP status, 000 when there is none
http_code() {
    local url=$1
    shift
    curl -s -o /dev/null --max-time 2 -w '%{http_code}' "$@" "$url" || true
}

# spawn NAME CONF PREFIX ERRLOG: start one nginx master in the foreground
# mode (daemon off) in its own session, record its pid
spawn() {
    local name=$1 conf=$2 prefix=$3 errlog=$4 pid
    setsid "$NGINX" -p "$prefix/" -c "$conf" -e "$errlog" -g "daemon off;" \
        </dev/null >>"$errlog" 2>&1 &
    pid=$!
    record "$name" "$pid"
    STARTED+=("$name")
}

# wait_ready NAME URL EXPECT [curl args]: poll until URL answers with
# status EXPECT, the process dies, or START_TIMEOUT passes
wait_ready() {
    local name=$1 url=$2 expect=$3 pid code=000 i
    shift 3
    pid=$(pid_of "$name")
    local deadline=$((SECONDS + START_TIMEOUT))
    for ((i = 0; i < START_TIMEOUT * 20 + 1; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) exited while starting; its log:"
            tail -n 20 "$(errlog_of "$name")" >&2 || true
            return 1
        fi
        code=$(http_code "$url" "$@")
        [[ $code == "$expect" ]] && return 0
        (( SECONDS < deadline )) || break
        sleep 0.05
    done
    say "$name: $url answered $code, not $expect, within ${START_TIMEOUT}s"
    tail -n 20 "$(errlog_of "$name")" >&2 || true
    return 1
}

errlog_of() {
    case $1 in
        gateway) echo "$VAR_DIR/logs/gateway.error.log" ;;
        node:*) echo "$VAR_DIR/logs/node-${1#node:}.error.log" ;;
    esac
}

start_node() {
    local p=$1 pid
    pid=$(pid_of "node:$p")
    if ours "$pid" "node:$p"; then
        say "node:$p already runs (pid $pid)"
        return 0
    fi
    if accepting "$p"; then
        say "port $p is in use by another program"
        return 1
    fi
    spawn "node:$p" "$VAR_DIR/conf/node-$p.conf" "$VAR_DIR/nodes/$p" \
        "$VAR_DIR/logs/node-$p.error.log"
    wait_ready "node:$p" "http://127.0.0.1:$p/" 200 -X OPTIONS
}

start_gateway() {
    local pid
    pid=$(pid_of gateway)
    if ours "$pid" gateway; then
        say "gateway already runs (pid $pid)"
        return 0
    fi
    local p
    for p in "$GATEWAY_PORT" "$METRICS_PORT"; do
        if accepting "$p"; then
            say "port $p is in use by another program"
            return 1
        fi
    done
    spawn gateway "$VAR_DIR/conf/gateway.conf" "$VAR_DIR/gateway" \
        "$VAR_DIR/logs/gateway.error.log"
    # /metrics answers once the workers run; the gateway port is bound by
    # the same master before that (a request there would be counted)
    wait_ready gateway "http://127.0.0.1:$METRICS_PORT/metrics" 200 \
        || return 1
    accepting "$GATEWAY_PORT" && return 0
    say "gateway: nothing accepts on port $GATEWAY_PORT"
    return 1
}

# stop_one NAME: TERM (nginx: fast shutdown), wait up to STOP_TIMEOUT, then
# running PID: alive and not a zombie (an exited nginx whose parent is not
# us waits as a zombie until init reaps it)
running() {
    kill -0 "$1" 2>/dev/null || return 1
    local st
    st=$(cut -d')' -f2 "/proc/$1/stat" 2>/dev/null | awk '{print $1}')
    [[ $st != Z ]]
}

# KILL; only a pid that runs our own nginx for NAME
stop_one() {
    local name=$1 pid i
    pid=$(pid_of "$name")
    if ! ours "$pid" "$name"; then
        record "$name" ""
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    for ((i = 0; i < STOP_TIMEOUT * 20 + 1; i++)); do
        running "$pid" || break
        if (( SECONDS >= deadline )); then
            say "$name (pid $pid) still runs after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.05
    done
    wait "$pid" 2>/dev/null || true   # reap it when it is our child
    record "$name" ""
}

stop_all() {
    local name
    [[ -f $PIDS_FILE ]] || return 0
    stop_one gateway
    for name in $(awk '$1 ~ /^node:/ { print $1 }' "$PIDS_FILE"); do
        stop_one "$name"
    done
    rm -f "$PIDS_FILE"
}

start_all() {
    local p name
    if [[ -f $PIDS_FILE ]]; then
        for name in $(awk '{ print $1 }' "$PIDS_FILE"); do
            ours "$(pid_of "$name")" "$name" \
                && die "already running ($name); '$0 stop' first" \
                       "(VAR_DIR=$VAR_DIR)"
        done
        rm -f "$PIDS_FILE"
    fi
    for p in "$GATEWAY_PORT" "$METRICS_PORT" "${NODES[@]}"; do
        accepting "$p" && die "port $p is in use by another program"
    done
    prepare
    STARTED=()
    for p in "${NODES[@]}"; do
        start_node "$p" || { stop_all; die "storage node $p did not start"; }
    done
    start_gateway || { stop_all; die "the gateway did not start"; }
}

print_urls() {
    local p nodes=""
    for p in "${NODES[@]}"; do nodes+="http://127.0.0.1:$p/ "; done
    cat <<EOF
shmprom embedded default is running:
  gateway (WebDAV)  http://127.0.0.1:$GATEWAY_PORT/
  metrics           http://127.0.0.1:$METRICS_PORT/metrics
  status page       http://127.0.0.1:$METRICS_PORT/status
  storage nodes     $nodes
  data              $VAR_DIR/data
  logs              $VAR_DIR/logs
try:
  curl -T README.md http://127.0.0.1:$GATEWAY_PORT/README.md
  rclone copy ./some/dir ":webdav,url='http://127.0.0.1:$GATEWAY_PORT':some/dir"
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^dfs_gateway_requests
EOF
}

cmd_run() {
    check_install
    start_all
    trap 'echo; say "stopping"; stop_all; exit 0' INT TERM
    trap 'stop_all' EXIT
    print_urls
    echo "Ctrl-C stops it."
    # wait -n returns once per exited child: at most one round per child
    local i gw
    for ((i = 0; i <= ${#STARTED[@]}; i++)); do
        wait -n 2>/dev/null || true
        gw=$(pid_of gateway)
        if ! ours "$gw" gateway; then
            say "the gateway exited; stopping the storage nodes"
            trap - EXIT
            stop_all
            exit 1
        fi
        for p in "${NODES[@]}"; do
            ours "$(pid_of "node:$p")" "node:$p" \
                || say "storage node $p is not running"
        done
    done
    trap - EXIT
    stop_all
}

cmd_status() {
    local name pid rc=0
    [[ -f $PIDS_FILE ]] || { echo "not running"; return 1; }
    while read -r name pid; do
        if ours "$pid" "$name"; then
            echo "$name $pid running"
        else
            echo "$name $pid not running"; rc=1
        fi
    done <"$PIDS_FILE"
    return $rc
}

main() {
    local cmd=${1:-run}
    [[ ${START_ONLY:-0} == 1 && $cmd == run ]] && cmd=start
    check_settings
    case $cmd in
        run) cmd_run ;;
        start)
            check_install
            start_all
            print_urls
            ;;
        stop) stop_all ;;
        status) cmd_status ;;
        stop-node)
            [[ -n ${2:-} ]] || die "stop-node PORT"
            check_port "$2"
            stop_one "node:$2"
            ;;
        start-node)
            [[ -n ${2:-} ]] || die "start-node PORT"
            check_port "$2"
            [[ -f $VAR_DIR/conf/node-$2.conf ]] \
                || die "no storage node on port $2 (NODE_PORTS=$NODE_PORTS)"
            STARTED=()
            start_node "$2"
            ;;
        -h|--help|help) sed -n '2,26p' "$0" ;;
        *) die "unknown command \"$cmd\" (run, start, stop, status," \
               "stop-node, start-node)" ;;
    esac
}

main "$@"
