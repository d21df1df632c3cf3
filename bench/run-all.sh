#!/usr/bin/env bash
# bench/run-all.sh (make bench): runs every shmprom benchmark and (re)writes
# bench/RESULTS.md with the machine, the date, each benchmark's command,
# figures, the baseline measured in the same run, and the ratios.
#
#   bench/run-all.sh                 everything, ~18 minutes (~23 with the peer)
#   QUICK=1 bench/run-all.sh         short runs, ~2 minutes (debugging)
#   BENCH_ONLY="a c" bench/run-all.sh   a subset (a b c d e f)
#   PEER_LUA_PATH=/path/to/nginx-lua-prometheus bench/run-all.sh
#                                    also runs the peer in every benchmark
#   BENCH_RESULTS=path               write the report elsewhere
#   BENCH_KEEP=1                     keep the scratch directory
#
# Benchmarks, not tests: nothing here fails on a timing. Every benchmark is
# bounded in time (wrk durations, request counts, a timeout per benchmark),
# talks to 127.0.0.1 only, and stops the processes it started by their pids.
# The machine is shared and noisy: every figure is set against a baseline
# measured in the same run, with alternating runs and medians.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

QUICK=${QUICK:-0}
[[ $QUICK == 0 ]] && QUICK=
BENCH_ONLY=${BENCH_ONLY:-"a b c d e f"}
RESULTS=${BENCH_RESULTS:-$REPO/bench/RESULTS.md}
PEER_LUA_PATH=${PEER_LUA_PATH:-}

if [[ -n $PEER_LUA_PATH && ! -f $PEER_LUA_PATH/prometheus.lua ]]; then
    echo "bench: PEER_LUA_PATH=$PEER_LUA_PATH has no prometheus.lua" >&2
    exit 1
fi
for tool in nginx wrk curl perl; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing" >&2; exit 1; }
done
[[ -f target/release/libshmprom.so ]] \
    || { echo "bench: target/release/libshmprom.so missing: make build" >&2; exit 1; }

BENCH_WORK=$(mktemp -d "${TMPDIR:-/tmp}/shmprom-bench.XXXXXX")
BENCH_OUT=$BENCH_WORK/out
mkdir -p "$BENCH_OUT"
export BENCH_WORK BENCH_OUT QUICK PEER_LUA_PATH
cleanup() { [[ -n ${BENCH_KEEP:-} ]] || rm -rf "$BENCH_WORK"; }
trap cleanup EXIT

# per benchmark: script and upper bound on its run time (seconds)
declare -A SCRIPT=([a]=a-update-cost.pl [b]=b-end-to-end.pl [c]=c-render.pl
                   [d]=d-memory.pl [e]=e-scrape-under-load.pl [f]=f-new-series.pl)
declare -A LIMIT=([a]=420 [b]=720 [c]=420 [d]=240 [e]=420 [f]=360)

# Snapshot of what is measured: the library and the Lua wrapper as they are
# now (the repository may be rebuilt or edited while the benchmarks run);
# every nginx of the benchmarks loads these copies, except the gateway of
# (b), which scripts/run-gateway.sh starts from the repository itself.
BENCH_SNAP=$BENCH_WORK/snap
mkdir -p "$BENCH_SNAP/lib"
cp target/release/libshmprom.so "$BENCH_SNAP/lib/libshmprom.so"
cp target/release/ngx_http_shmprom_module.so "$BENCH_SNAP/lib/ngx_http_shmprom_module.so"
cp -r lua "$BENCH_SNAP/lua"
export BENCH_SNAP
sha256sum target/release/libshmprom.so >"$BENCH_OUT/lib.sha256"
git rev-parse --short HEAD >"$BENCH_OUT/git.head" 2>/dev/null
git status --porcelain -- src lua Cargo.toml include >"$BENCH_OUT/git.dirty" 2>/dev/null
started=$(date -u +%s)
echo "bench: scratch $BENCH_WORK${QUICK:+ (QUICK)}" >&2
for b in $BENCH_ONLY; do
    [[ -n ${SCRIPT[$b]:-} ]] || { echo "bench: unknown benchmark '$b'" >&2; continue; }
    echo "bench: ($b) ${SCRIPT[$b]}" >&2
    t0=$(date +%s)
    # timeout sends TERM to the script, which stops what it started
    timeout --kill-after=20 "${LIMIT[$b]}" perl "bench/${SCRIPT[$b]}" \
        2> >(tee "$BENCH_WORK/$b.log" >&2)
    rc=$?
    echo "$b $rc $(( $(date +%s) - t0 ))" >>"$BENCH_OUT/status"
    if (( rc != 0 )); then
        {
            echo "## ($b) FAILED (exit $rc)"
            echo
            echo '```'
            tail -n 30 "$BENCH_WORK/$b.log"
            echo '```'
            echo
        } >"$BENCH_OUT/$b.md"
    fi
done
echo "$(( $(date -u +%s) - started ))" >"$BENCH_OUT/total_secs"

perl bench/report.pl "$BENCH_OUT" "$RESULTS"
echo "bench: wrote $RESULTS" >&2
