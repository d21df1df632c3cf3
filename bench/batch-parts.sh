#!/usr/bin/env bash
# bench/batch-parts.sh: where the CPU of bench (f)'s batch goes, part by
# part. A check by hand beside `make bench` (its figures go into
# RESULTS.md's "Checks by hand"); writes nothing into the repository.
#
#   ROUNDS=5 bench/batch-parts.sh [REPO]
#
# One nginx, 1 worker, no load; six zones opened as bench (f) opens its
# first one (default prefault, "table"), two of 512m, two of 128m and two
# of 512m with cells_per_series = 21 (`512m/21`: the table a seventh of
# the size; one zone for each variant below), each with (f)'s histogram
# {path} of 19 buckets. A content_by_lua handler times one loop
# of 10k new label sets by the worker's thread CPU clock, the loop one of:
#   bare         the caller's part: `local lv = { "/b/" .. i }` and the
#                string put into a Lua table (emptied at the size a
#                family's label cache is; fill.lua's bare_batch, the
#                baseline bench (f) runs as batch-bare); no metrics library
#   table-SIZE   bare, plus shmprom_series_get through FFI for the label
#                set (what the wrapper's miss path calls): the shared
#                table's insert, key record and cell reservation, without
#                the wrapper and with no cell written
#   observe-SIZE `h:observe(0.01, { "/b/" .. i })`, bench (f)'s batch loop:
#                the whole path (wrapper, label cache, the new cells'
#                first writes and their page faults)
# ROUNDS rounds (default 9; a 128m zone holds ~119k of these label sets
# with 1 worker, and a variant takes 10k a round from its own), variants
# rotated; per variant the median over rounds of the loop's CPU time.
# REPO: the checkout whose lua/ and libshmprom.so are loaded (default:
# this one).
set -euo pipefail
ROUNDS=${ROUNDS:-9}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=${1:-$HERE}
LIB=$REPO/target/release/libshmprom.so
[[ -f $LIB ]] || { echo "batch-parts: $LIB is missing (make build)" >&2; exit 1; }
# shellcheck source=lib/scratch-nginx.sh
. "$HERE/bench/lib/scratch-nginx.sh"
sn_init batch-parts
{ sn_head 1 "$REPO" "$HERE"; cat <<EOC
    init_by_lua_block {
        local shmprom = require "resty.shmprom"
        local F = require "shmprom_bench.fill"
        H = {}
        for _, z in ipairs({ { "512m" }, { "128m" }, { "512m", 21 } }) do
            local size, cps = z[1], z[2]
            local key = size .. (cps and "/" .. cps or "")
            for _, v in ipairs({ "table", "observe" }) do
                local m = shmprom.new{ zone = "bp_" .. v .. "_" .. key:gsub("/", "_"),
                                       size = size, cells_per_series = cps }
                local _, h = F.families(m, "bp", "path")
                H[v .. ":" .. key] = { m = m, h = h }
            end
        end
    }
    init_worker_by_lua_block {
        for _, z in pairs(H) do z.m:init_worker() end
    }
    server {
        listen 127.0.0.1:$PORT;
        location = /run {
            content_by_lua_block {
                local ffi = require "ffi"
                local F = require "shmprom_bench.fill"
                local C = ffi.load("$LIB")
                local v, size = ngx.var.arg_v, ngx.var.arg_size
                local base, n = tonumber(ngx.var.arg_base), tonumber(ngx.var.arg_n)
                local z = H[v .. ":" .. size] or H["table:128m"]
                local vals = ffi.new("const char*[1]")
                local lens = ffi.new("size_t[1]")
                local errbuf = ffi.new("char[256]")
                -- the wrapper's own fields, read here only to call the
                -- library as its miss path does
                local zp, id = z.h.zone.ptr, z.h.id
                local failed = 0
                local c0, f0 = F.cpu_ns(), F.thread_faults()
                if v == "bare" then
                    F.bare_batch(base, n)
                elseif v == "table" then
                    local keep = F.keep
                    for i = base, base + n - 1 do
                        local lv = { "/b/" .. i }
                        local s = lv[1]
                        vals[0] = s
                        lens[0] = #s
                        local r = C.shmprom_series_get(zp, id, 1, vals, lens, errbuf, 256)
                        if r < 0 then failed = failed + 1 end
                        keep(s, tonumber(r))
                    end
                else
                    local h = z.h
                    for i = base, base + n - 1 do
                        if not h:observe(0.01, { "/b/" .. i }) then failed = failed + 1 end
                    end
                end
                local cpu_ms = (F.cpu_ns() - c0) / 1e6
                ngx.say(string.format("%.3f %d %d", cpu_ms, F.thread_faults() - f0, failed))
            }
        }
    }
}
EOC
} >"$W/nginx.conf"
sn_start batch-parts "http://127.0.0.1:$PORT/run?v=bare&size=128m&base=0&n=0"
VARIANTS=(bare table:512m observe:512m table:128m observe:128m table:512m/21 observe:512m/21)
echo "batch-parts: $ROUNDS rounds of 10k new label sets, 1 worker, $REPO (commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
declare -A CPU FAULTS
gen=0
for r in $(seq 0 $((ROUNDS - 1))); do
    for k in $(seq 0 $((${#VARIANTS[@]} - 1))); do
        var=${VARIANTS[$(( (k + r) % ${#VARIANTS[@]} ))]}
        v=${var%%:*}; size=${var#*:}; [[ $size == "$var" ]] && size=128m
        gen=$((gen + 1))
        read -r ms faults failed < <(curl -s "http://127.0.0.1:$PORT/run?v=$v&size=$size&base=$((gen * 1000000))&n=10000")
        [[ $failed == 0 ]] || { echo "batch-parts: $var refused $failed label sets (zone full?)" >&2; exit 1; }
        CPU[$var]+="$ms "
        FAULTS[$var]+="$faults "
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
printf '%-16s %14s %12s %14s  %s\n' variant "CPU ms / 10k" "us each" "page faults" "per round (ms)"
for var in "${VARIANTS[@]}"; do
    m=$(echo "${CPU[$var]}" | median)
    printf '%-16s %14.2f %12.3f %14s  %s\n' "$var" "$m" "$(echo "$m / 10000 * 1000" | bc -l)" \
        "$(echo "${FAULTS[$var]}" | median)" "${CPU[$var]}"
done
