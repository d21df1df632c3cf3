#!/usr/bin/env bash
# bench/render-callgrind.sh: user-space instructions of one render of bench
# (c)'s 230k series (10k counters + 10k histograms of 19 buckets), counted
# by callgrind: load-independent, beside (c)'s wall-clock figures. Builds
# and runs examples/render_count.rs under callgrind with 0 and with N
# renders; (difference) / N is one render. Writes nothing into the
# repository.
#
#   bench/render-callgrind.sh [N]        (default 3)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-3}
command -v valgrind >/dev/null || { echo "render-callgrind: valgrind is missing" >&2; exit 1; }
(cd "$REPO" && cargo build --release --quiet --example render_count)
W=$(mktemp -d /tmp/shmprom-rendercg.XXXXXX)
trap 'rm -rf "$W"' EXIT
count() {
    valgrind --tool=callgrind --callgrind-out-file="$W/cg.$1" \
        "$REPO/target/release/examples/render_count" "$1" >"$W/out.$1" 2>"$W/vg.$1"
    awk '/^(summary|totals):/ { print $2; exit }' "$W/cg.$1"
}
base=$(count 0)
with=$(count "$N")
per=$(((with - base) / N))
lines=230000
echo "render of 230k series: $per instructions ($((per / lines)) per line), $(cat "$W/out.$N")"
