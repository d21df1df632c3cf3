# bench/lib/callgrind.sh: the instruction count of one nginx under callgrind,
# for bench/gw-callgrind.sh and bench/log-callgrind.sh (sourced, bash).
#
#   CG_DIR=/scratch/dir   where the callgrind and valgrind outputs go
#   cg_count TAG URL N ERRLOG -- NGINX-ARGUMENTS...
#
# starts `valgrind --tool=callgrind nginx NGINX-ARGUMENTS` (a single-process
# configuration: master_process off, daemon off), waits until URL answers,
# GETs URL 1000 times over one keepalive connection to warm up (LuaJIT
# compiles what it will), zeroes the counters (callgrind_control -z), GETs
# it N times more, dumps the counters (callgrind_control -d), stops nginx
# and prints the instructions counted between zero and dump. When nginx
# does not answer, prints the tails of valgrind's log and ERRLOG and exits.

free_port() {
    perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen=>1,LocalAddr=>"127.0.0.1",LocalPort=>0)->sockport'
}

# cg_urls URL COUNT: a curl config of COUNT GETs of URL
cg_urls() {
    local i
    for ((i = 0; i < $2; i++)); do printf 'url = "%s"\noutput = /dev/null\n' "$1"; done
}

cg_count() {
    local tag=$1 url=$2 n=$3 errlog=$4
    shift 5
    valgrind --tool=callgrind --callgrind-out-file="$CG_DIR/cg.$tag" nginx "$@" \
        >"$CG_DIR/vg-$tag.log" 2>&1 &
    local vpid=$! up= f
    for _ in $(seq 1 150); do
        if curl -s -o /dev/null "$url"; then up=1; break; fi
        sleep 0.2
    done
    if [[ -z $up ]]; then
        echo "callgrind: $tag did not start:" >&2
        tail -5 "$CG_DIR/vg-$tag.log" "$errlog" >&2
        kill "$vpid"
        exit 1
    fi
    cg_urls "$url" 1000 >"$CG_DIR/warm"; curl -s -K "$CG_DIR/warm"
    callgrind_control -z "$vpid" >/dev/null 2>&1
    cg_urls "$url" "$n" >"$CG_DIR/timed"; curl -s -K "$CG_DIR/timed"
    callgrind_control -d "$vpid" >/dev/null 2>&1
    kill "$vpid"; wait "$vpid" 2>/dev/null || true
    f=$(ls -t "$CG_DIR"/cg."$tag".* | head -n 1)
    awk '/^(summary|totals):/ { print $2; exit }' "$f"
}
