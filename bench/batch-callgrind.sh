#!/usr/bin/env bash
# bench/batch-callgrind.sh: user-space instructions per new label set of
# bench (f)'s batch loop, counted by callgrind, and the cache misses its
# simulated caches take. A diagnostic beside (f): instruction counts do not
# depend on the machine's load, wall-clock figures do. Not part of
# run-all.sh; writes nothing into the repository.
#
#   bench/batch-callgrind.sh [BATCHES] [REPO]     (default 10 batches)
#
# One single-process nginx (master_process off) per variant under valgrind
# --tool=callgrind --cache-sim=yes, a zone opened as bench (f)'s first one
# (512m, default prefault) with (f)'s histogram {path} of 19 buckets. Each
# GET of /batch runs one loop of 1,000 new label sets (a fresh base each
# time); 3 GETs warm up (LuaJIT compiles the loop), the counters are zeroed
# (callgrind_control -z), BATCHES more GETs follow and the counters are
# dumped. Variants:
#   bare     the caller's loop alone (fill.lua's bare_batch, bench (f)'s
#            batch-bare row)
#   observe  `h:observe(0.01, { "/b/" .. i })`, bench (f)'s batch loop
# Per variant: instructions, D1 and last-level data read/write misses per
# label set (the simulated caches are valgrind's model of this CPU, not
# the machine's; TLB misses are not modelled). REPO: the checkout whose
# lua/ and libshmprom.so are loaded (default: this one).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BATCHES=${1:-10}
REPO=${2:-$HERE}
N=1000
for t in valgrind callgrind_control curl perl nginx; do
    command -v "$t" >/dev/null || { echo "batch-callgrind: $t is missing" >&2; exit 1; }
done
[[ -f $REPO/target/release/libshmprom.so ]] || {
    echo "batch-callgrind: $REPO/target/release/libshmprom.so is missing (make build)" >&2; exit 1; }
W=$(mktemp -d /tmp/shmprom-batchcg.XXXXXX)
cleanup() { [[ -n ${KEEP:-} ]] || rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/logs"
# shellcheck source=lib/callgrind.sh
. "$HERE/bench/lib/callgrind.sh"
user=
[[ $(id -u) == 0 ]] && user='user root root;'

conf() { # variant port
    cat <<EOF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
$user
master_process off;
daemon off;
worker_processes 1;
pid $W/nginx-$1.pid;
error_log $W/logs/$1.err notice;
events { worker_connections 64; }
http {
    access_log off;
    lua_package_path "$REPO/lua/?.lua;$HERE/bench/lua/?.lua;;";
    lua_package_cpath "$REPO/target/release/?.so;;";
    client_body_temp_path $W/body;
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        bench_m = shmprom.new{ zone = "batchcg", size = "512m" }
        bench_c, bench_h = F.families(bench_m, "bench_f", "path")
        next_base = 0
    }
    init_worker_by_lua_block { bench_m:init_worker() }
    server {
        listen 127.0.0.1:$2;
        location = /batch {
            content_by_lua_block {
                local F = require "shmprom_bench.fill"
                next_base = next_base + $N
                local base, h = next_base, bench_h
                if "$1" == "bare" then
                    F.bare_batch(base, $N)
                else
                    for i = base, base + $N - 1 do
                        assert(h:observe(0.01, { "/b/" .. i }))
                    end
                end
                ngx.say("ok")
            }
        }
    }
}
EOF
}

# cg_events FILE: the summary's events, as "Ir Dr Dw D1mr D1mw DLmr DLmw"
cg_events() {
    awk '/^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
         /^(summary|totals):/ { for (i = 2; i <= NF; i++) v[name[i]] = $i;
             print v["Ir"]+0, v["Dr"]+0, v["Dw"]+0, v["D1mr"]+0, v["D1mw"]+0, v["DLmr"]+0, v["DLmw"]+0; exit }' "$1"
}

echo "batch-callgrind: $BATCHES batches of $N new label sets per variant, $REPO (commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
printf '%-8s %10s %10s %10s %10s %10s   (per new label set)\n' variant instr "D1 rd miss" "D1 wr miss" "LL rd miss" "LL wr miss"
for v in bare observe; do
    port=$(free_port)
    conf "$v" "$port" >"$W/$v.conf"
    url="http://127.0.0.1:$port/batch"
    valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$W/cg.$v" \
        nginx -p "$W/" -c "$W/$v.conf" >"$W/vg-$v.log" 2>&1 &
    vpid=$!
    up=
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "$url"; then up=1; break; fi
        sleep 0.2
    done
    if [[ -z $up ]]; then
        echo "batch-callgrind: $v did not start:" >&2
        tail -5 "$W/vg-$v.log" "$W/logs/$v.err" >&2
        kill "$vpid"
        exit 1
    fi
    cg_urls "$url" 3 >"$W/warm"; curl -s -K "$W/warm"
    callgrind_control -z "$vpid" >/dev/null 2>&1
    cg_urls "$url" "$BATCHES" >"$W/timed"; curl -s -K "$W/timed"
    callgrind_control -d "$vpid" >/dev/null 2>&1
    kill "$vpid"; wait "$vpid" 2>/dev/null || true
    f=$(ls -t "$W"/cg."$v".* | head -n 1)
    read -r ir dr dw d1mr d1mw dlmr dlmw < <(cg_events "$f")
    per=$((BATCHES * N))
    printf '%-8s %10d %10.1f %10.1f %10.1f %10.1f\n' "$v" $((ir / per)) \
        "$(echo "$d1mr / $per" | bc -l)" "$(echo "$d1mw / $per" | bc -l)" \
        "$(echo "$dlmr / $per" | bc -l)" "$(echo "$dlmw / $per" | bc -l)"
    [[ -n ${KEEP:-} ]] && echo "  (kept: $f)"
done
