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
# shellcheck source=lib/callgrind.sh
. "$HERE/bench/lib/callgrind.sh"
cg_init batchcg
CG_WARM=3
CG_VALGRIND_OPTS=--cache-sim=yes

conf() { # variant port
    cg_conf_head "$1"
    cat <<EOF
    lua_package_path "$REPO/lua/?.lua;$HERE/bench/lua/?.lua;;";
    lua_package_cpath "$REPO/target/release/?.so;;";
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
    f=$(cg_run "$v" "http://127.0.0.1:$port/batch" "$BATCHES" "$W/logs/$v.err" -- \
        -p "$W/" -c "$W/$v.conf") || exit 1
    read -r ir dr dw d1mr d1mw dlmr dlmw < <(cg_events "$f")
    per=$((BATCHES * N))
    printf '%-8s %10d %10.1f %10.1f %10.1f %10.1f\n' "$v" $((ir / per)) \
        "$(echo "$d1mr / $per" | bc -l)" "$(echo "$d1mw / $per" | bc -l)" \
        "$(echo "$dlmr / $per" | bc -l)" "$(echo "$dlmw / $per" | bc -l)"
    if [[ -n ${KEEP:-} ]]; then echo "  (kept: $f)"; fi
done
