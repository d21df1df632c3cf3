#!/usr/bin/env bash
# bench/full-zone.sh: how long a full zone takes to refuse new label sets.
# A check by hand beside `make bench` (its figures go into RESULTS.md's
# "Full zone" section); writes nothing into the repository.
#
#   bench/full-zone.sh [KIND] [REPO]
#
# KIND: histogram (default; one family `fz_seconds{id}` of 19 buckets, 21
# cells a label set: the zone's cells run out before its slots) or counter
# (`fz_total{id}`: the slots run out first). REPO: the checkout whose
# lua/ and target/release/libshmprom.so are loaded (default: this one;
# another worktree compares two commits). WORKERS=n: nginx workers (default
# 1; the zone has a plane per worker plus a shared one, and one request
# fills it from one worker). One nginx, a 32m zone;
# a content_by_lua handler creates label sets k = from .. from+n-1 and
# times its loop; the script fills the zone (200k tries for histograms,
# 600k for counters), then asks for 10k new label sets three times.
set -euo pipefail
KIND=${1:-histogram}
WORKERS=${WORKERS:-1}
# this checkout: its bench/lua gives the buckets
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=${2:-$HERE}
[[ -f $REPO/target/release/libshmprom.so ]] || { echo "full-zone: $REPO/target/release/libshmprom.so is missing (make build)" >&2; exit 1; }
case $KIND in
    histogram) FILL=200000
               DEF='F = M:histogram("fz_seconds", "Full zone check", { "id" }, require("shmprom_bench.fill").BUCKETS19)'
               REC='F:observe(0.01, { tostring(k) })' ;;
    counter)   FILL=600000
               DEF='F = M:counter("fz_total", "Full zone check", { "id" })'
               REC='F:inc(1, { tostring(k) })' ;;
    *) echo "full-zone: KIND is histogram or counter" >&2; exit 1 ;;
esac
# shellcheck source=lib/scratch-nginx.sh
. "$HERE/bench/lib/scratch-nginx.sh"
sn_init full-zone
{ sn_head $WORKERS "$REPO" "$HERE"; cat <<EOC
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        M = shmprom.new{ zone = "fz", size = "32m" }
        $DEF
    }
    init_worker_by_lua_block { M:init_worker() }
    server {
        listen 127.0.0.1:$PORT;
        location = /fill {
            content_by_lua_block {
                local from, n = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_n)
                ngx.update_time()
                local t0 = ngx.now()
                local made, refused = 0, 0
                for k = from, from + n - 1 do
                    if $REC then made = made + 1 else refused = refused + 1 end
                end
                ngx.update_time()
                ngx.say(made, " created, ", refused, " refused, ",
                        string.format("%.3f", ngx.now() - t0), " s")
            }
        }
    }
}
EOC
} >"$W/nginx.conf"
sn_start full-zone "http://127.0.0.1:$PORT/fill?from=0&n=0"
echo "$KIND, $WORKERS worker(s), $REPO (commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "fill, $FILL tries: $(curl -s "http://127.0.0.1:$PORT/fill?from=0&n=$FILL")"
for r in 1 2 3; do
    echo "10k new:           $(curl -s "http://127.0.0.1:$PORT/fill?from=$((r * 1000000))&n=10000")"
done
