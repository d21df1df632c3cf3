# bench/lib/callgrind.sh: one nginx under callgrind, for bench/gw-callgrind.sh,
# bench/log-callgrind.sh and bench/batch-callgrind.sh (sourced, bash).
#
#   cg_init TAG           makes a scratch directory W (/tmp/shmprom-TAG.*,
#                         removed at exit unless KEEP is set) with W/logs,
#                         and sets CG_DIR to it
#   CG_DIR=/scratch/dir   where the callgrind and valgrind outputs go
#   CG_WARM=1000          GETs of URL before the counters are zeroed
#   CG_VALGRIND_OPTS=     more valgrind options (e.g. --cache-sim=yes)
#   cg_run TAG URL N ERRLOG -- NGINX-ARGUMENTS...
#   cg_count TAG URL N ERRLOG -- NGINX-ARGUMENTS...
#   cg_conf_head TAG [LOAD_MODULE_LINE]
#
# cg_run starts `valgrind --tool=callgrind nginx NGINX-ARGUMENTS` (a
# single-process configuration: master_process off, daemon off), waits
# until URL answers, GETs URL CG_WARM times over one keepalive connection
# to warm up (LuaJIT compiles what it will), zeroes the counters
# (callgrind_control -z), GETs it N times more, dumps the counters
# (callgrind_control -d), stops nginx and prints the path of the dump.
# cg_count prints the instructions counted between zero and dump instead.
# When nginx does not answer, both print the tails of valgrind's log and
# ERRLOG and exit. cg_conf_head prints such a configuration's head, up to
# the open `http {` block with access_log off and its temp path in $W
# (LOAD_MODULE_LINE: one more module to load).

cg_init() {
    W=$(mktemp -d "/tmp/shmprom-$1.XXXXXX")
    # shellcheck disable=SC2317
    cg_cleanup() { [[ -n ${KEEP:-} ]] || rm -rf "$W"; }
    trap cg_cleanup EXIT
    mkdir -p "$W/logs"
    CG_DIR=$W
}

free_port() {
    perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen=>1,LocalAddr=>"127.0.0.1",LocalPort=>0)->sockport'
}

# cg_urls URL COUNT: a curl config of COUNT GETs of URL
cg_urls() {
    local i
    for ((i = 0; i < $2; i++)); do printf 'url = "%s"\noutput = /dev/null\n' "$1"; done
}

cg_run() {
    local tag=$1 url=$2 n=$3 errlog=$4
    shift 5
    # shellcheck disable=SC2086
    valgrind --tool=callgrind ${CG_VALGRIND_OPTS:-} --callgrind-out-file="$CG_DIR/cg.$tag" nginx "$@" \
        >"$CG_DIR/vg-$tag.log" 2>&1 &
    local vpid=$! up=
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "$url"; then up=1; break; fi
        sleep 0.2
    done
    if [[ -z $up ]]; then
        echo "callgrind: $tag did not start:" >&2
        tail -5 "$CG_DIR/vg-$tag.log" "$errlog" >&2
        kill "$vpid"
        exit 1
    fi
    cg_urls "$url" "${CG_WARM:-1000}" >"$CG_DIR/warm"; curl -s -K "$CG_DIR/warm"
    callgrind_control -z "$vpid" >/dev/null 2>&1
    cg_urls "$url" "$n" >"$CG_DIR/timed"; curl -s -K "$CG_DIR/timed"
    callgrind_control -d "$vpid" >/dev/null 2>&1
    kill "$vpid"; wait "$vpid" 2>/dev/null || true
    ls -t "$CG_DIR"/cg."$tag".* | head -n 1
}

cg_count() {
    local f
    f=$(cg_run "$@") || exit 1
    awk '/^(summary|totals):/ { print $2; exit }' "$f"
}

cg_conf_head() {
    local user=
    [[ $(id -u) == 0 ]] && user='user root root;'
    cat <<EOF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
${2:-}
$user
master_process off;
daemon off;
worker_processes 1;
pid $W/nginx-$1.pid;
error_log $W/logs/$1.err notice;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $W/body;
EOF
}
