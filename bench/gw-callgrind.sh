#!/usr/bin/env bash
# bench/gw-callgrind.sh: user-space instructions per proxied GET through the
# gateway, counted by callgrind: no metrics, the preset recorded by the nginx
# module, the preset recorded by its Lua phase handlers. A diagnostic beside
# (b): instruction counts do not depend on the machine's load, wall-clock
# figures do. Not part of run-all.sh; writes nothing into the repository.
#
#   bench/gw-callgrind.sh [REQUESTS]        (default 3000)
#
# scripts/run-gateway.sh starts the storage nodes and a gateway (RECORDER=
# module) on free ports in a scratch VAR_DIR; its rendered config is turned
# into three single-process nginx configs (master_process off, 1 worker,
# access_log off, node probes once an hour): "nm" without the module's two lines (load_module,
# shmprom_gateway on), "module" as rendered, "lua" with the preset's
# set_by_lua/log_by_lua lines instead. Each runs under valgrind --tool=
# callgrind; curl GETs a 1 KiB file 1000 times over one keepalive connection
# to warm up, the counters are zeroed (callgrind_control -z), REQUESTS more
# GETs follow, and the counters are dumped (callgrind_control -d).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-3000}
for t in valgrind callgrind_control curl perl; do
    command -v "$t" >/dev/null || { echo "gw-callgrind: $t is missing" >&2; exit 1; }
done
W=$(mktemp -d /tmp/shmprom-gwcg.XXXXXX)
# shellcheck source=lib/callgrind.sh
. "$REPO/bench/lib/callgrind.sh"
CG_DIR=$W
GP=$(free_port); MP=$(free_port); N1=$(free_port); N2=$(free_port); N3=$(free_port)
export GATEWAY_PORT=$GP METRICS_PORT=$MP NODE_PORTS="$N1 $N2 $N3" VAR_DIR=$W/var RECORDER=module
cleanup() { "$REPO/scripts/run-gateway.sh" stop >/dev/null 2>&1 || true; [[ -n ${KEEP:-} ]] || rm -rf "$W"; }
trap cleanup EXIT
"$REPO/scripts/run-gateway.sh" start >"$W/start.log" 2>&1 || { cat "$W/start.log"; exit 1; }
head -c 1024 /dev/zero | tr '\0' x >"$W/var/data/bench-1k.bin"

# mode port metrics-port < rendered config > single-process config
variant() {
    perl -e '
        my ($mode, $port, $mport, $gp, $mp, $w) = @ARGV;
        local $/; my $c = <STDIN>;
        $c =~ s/^worker_processes \d+;/worker_processes 1;\nmaster_process off;\ndaemon off;/m;
        $c =~ s/127\.0\.0\.1:$gp;/127.0.0.1:$port;/ or die "no gateway listen\n";
        $c =~ s/127\.0\.0\.1:$mp;/127.0.0.1:$mport;/ or die "no metrics listen\n";
        $c =~ s{^pid \S+;}{pid $w/cg-$mode.pid;}m;
        $c =~ s{access_log \S+ dfs_gateway;}{access_log off;};
        # the node probes (timers) would add their work to whichever run lasts longer
        $c =~ s/probe_interval = 1,/probe_interval = 3600,/ or die "no probe_interval\n";
        my $load = qr{^\s*load_module \S*ngx_http_shmprom_module\.so;\s*\n}m;
        my $on = qr{^(\s*)shmprom_gateway on;\s*\n}m;
        if ($mode eq "nm") { $c =~ s/$load// or die; $c =~ s/$on// or die }
        elsif ($mode eq "lua") {
            $c =~ s/$load// or die;
            $c =~ s/$on/$1set_by_lua_block \$dfs_gateway_begun { return gateway.begin() }\n$1log_by_lua_block { gateway.log() }\n/ or die;
        }
        print $c;' "$@"
}

declare -A IR
for mode in nm module lua; do
    port=$(free_port); mport=$(free_port)
    variant "$mode" "$port" "$mport" "$GP" "$MP" "$W" <"$W/var/conf/gateway.conf" >"$W/cg-$mode.conf"
    ir=$(cg_count "$mode" "http://127.0.0.1:$port/bench-1k.bin" "$N" "$W/cg-$mode.err" -- \
        -p "$W/" -e "$W/cg-$mode.err" -c "$W/cg-$mode.conf") || exit 1
    IR[$mode]=$ir
    printf '%-7s %12s instructions / %d GETs = %6d per request\n' "$mode" "$ir" "$N" $((ir / N))
done
printf 'module: +%d per request over nm; lua: +%d\n' \
    $(((IR[module] - IR[nm]) / N)) $(((IR[lua] - IR[nm]) / N))
