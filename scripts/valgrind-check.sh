#!/usr/bin/env bash
# scripts/valgrind-check.sh: memcheck over libshmprom, two ways.
#
#   1. the in-process Lua tests (tests/lua_api.rs: mlua's LuaJIT loads
#      lua/resty/shmprom.lua and target/release/libshmprom.so) under
#      valgrind --tool=memcheck;
#   2. t/ files with nginx itself under valgrind (--trace-children=yes,
#      master_process on, daemon on: the master, every worker and every
#      reload run under memcheck), through the harness's SHMPROM_NGINX hook.
#
# Only errors with a frame in libshmprom (or a shmprom:: Rust symbol) or in
# the nginx module (ngx_http_shmprom_module.so) count:
# LuaJIT and nginx are known to upset memcheck on their own (LuaJIT's string
# hashing reads whole words past the end of strings, its allocator and JIT
# code), and those are reported as "other" for information.
#
#   scripts/valgrind-check.sh                      lua_api + t/074-hostile.t t/073-full.t
#   scripts/valgrind-check.sh t/001-core.t ...     lua_api + the given t/ files
#   SKIP_LUA_API=1 scripts/valgrind-check.sh ...   only the t/ files
#   SKIP_T=1 scripts/valgrind-check.sh             only lua_api
#   VG_DIR=/some/dir                               where the logs go (default: a temp dir, kept)
#
# Under valgrind the t/ files see an extra "[alert] setrlimit(RLIMIT_NOFILE,
# 4096) failed" per worker (valgrind keeps the hard limit of descriptors for
# itself) and run slower: their own "no [alert] in the log" and timing
# checks may fail there; what this script judges is memcheck's findings.
# nginx's process titles are not visible under valgrind: the harness is told
# so (SHMPROM_NO_PROCTITLE=1) and tells workers apart by reload generation.
#
# Exit status: 0 when no error is attributed to libshmprom, 1 otherwise, 2
# when a step could not run. Needs valgrind (apt-get install valgrind) and a
# built library (make build).

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
VG_DIR=${VG_DIR:-$(mktemp -d /tmp/shmprom-valgrind-XXXXXX)}
mkdir -p "$VG_DIR"
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}

command -v valgrind >/dev/null || { echo "valgrind-check: no valgrind (apt-get install valgrind)" >&2; exit 2; }
[[ -f target/release/libshmprom.so ]] || { echo "valgrind-check: build first (make build)" >&2; exit 2; }

VG_OPTS=(--tool=memcheck --error-limit=no --num-callers=40 --smc-check=all-non-file
         --track-origins=no --leak-check=no --child-silent-after-fork=no --fullpath-after=)

if [[ $# -gt 0 ]]; then
    T_FILES=("$@")
else
    T_FILES=(t/074-hostile.t t/073-full.t)
fi

status=0
say() { echo "valgrind-check: $*" >&2; }

# analyse LOG...: prints a summary; returns 1 if an error touches libshmprom
analyse() {
    VG_REPO=$REPO perl -e '
        my ($ours, $other, %kinds, %first) = (0, 0);
        for my $f (@ARGV) {
            open my $fh, "<", $f or next;
            my ($block, $kind) = ("", undef);
            my $flush = sub {
                return unless defined $kind;
                # a frame of ours: the library file, a Rust path in the
                # crate, an exported shmprom_* function, the nginx module
                # (ngx_http_shmprom_*), or a source file of this repository
                # (full paths: --fullpath-after=)
                if ($block =~ /libshmprom|\bshmprom::|\bshmprom_\w+ \(|ngx_http_shmprom|\Q$ENV{VG_REPO}\E\/(?:src|nginx-module)\//) {
                    $ours++;
                    $kinds{$kind}++;
                    $first{$kind} //= "$f:\n$block";
                } else {
                    $other++;
                }
                ($block, $kind) = ("", undef);
            };
            while (my $l = <$fh>) {
                if ($l =~ /^==\d+== (Invalid (?:read|write|free)[^\n]*|Conditional jump[^\n]*|Use of uninitialised[^\n]*|Syscall param[^\n]*|Source and destination overlap[^\n]*|Mismatched free[^\n]*|Argument .* of function[^\n]*)$/) {
                    $flush->();
                    $kind = $1;
                    $kind =~ s/ of size \d+//;
                    $block = $l;
                } elsif (defined $kind) {
                    if ($l =~ /^==\d+== *$/) { $flush->() } else { $block .= $l }
                }
            }
            $flush->();
        }
        printf "  errors with a libshmprom frame: %d\n", $ours;
        printf "    %5d  %s\n", $kinds{$_}, $_ for sort keys %kinds;
        printf "  other errors (LuaJIT, nginx, libc; not counted): %d\n", $other;
        for my $k (sort keys %first) { print "  first \"$k\":\n$first{$k}\n" }
        exit($ours ? 1 : 0);
    ' "$@"
}

# ---------------------------------------------------------------- 1. lua_api
if [[ -z ${SKIP_LUA_API:-} ]]; then
    say "building tests/lua_api.rs"
    bin=$(cargo test --release --test lua_api --no-run --message-format=json 2>"$VG_DIR/lua_api.build.log" \
          | perl -MJSON::PP -ne 'my $m = eval { decode_json($_) } or next;
                                 print $m->{executable}, "\n" if ($m->{reason} // "") eq "compiler-artifact"
                                     && $m->{executable} && $m->{target}{name} eq "lua_api"' | tail -n 1)
    if [[ -z $bin || ! -x $bin ]]; then
        say "could not build the lua_api test (see $VG_DIR/lua_api.build.log)"
        status=2
    else
        say "running $bin under memcheck"
        rm -f "$VG_DIR"/lua_api.*.vg
        valgrind "${VG_OPTS[@]}" --trace-children=no --log-file="$VG_DIR/lua_api.%p.vg" \
            "$bin" --test-threads=1 >"$VG_DIR/lua_api.out" 2>&1
        rc=$?
        echo "lua_api under memcheck: test exit $rc ($(grep -h 'test result' "$VG_DIR/lua_api.out" | tail -n 1))"
        [[ $rc == 0 ]] || { say "lua_api failed under valgrind: $VG_DIR/lua_api.out"; status=2; }
        analyse "$VG_DIR"/lua_api.*.vg || status=1
    fi
fi

# ---------------------------------------------------------------- 2. t/ under valgrind nginx
if [[ -z ${SKIP_T:-} ]]; then
    wrapper=$VG_DIR/nginx-under-valgrind
    cat >"$wrapper" <<EOF
#!/bin/sh
exec valgrind ${VG_OPTS[*]} --trace-children=yes --log-file=$VG_DIR/nginx.%p.vg $NGINX_BIN "\$@"
EOF
    chmod +x "$wrapper"
    for t in "${T_FILES[@]}"; do
        name=$(basename "$t" .t)
        say "running $t with nginx under memcheck"
        rm -f "$VG_DIR"/nginx.*.vg
        start=$SECONDS
        # (scripts/run-gateway.sh, which t/040 and t/041 start the
        # gateway with, takes SHMPROM_NGINX too)
        SHMPROM_NGINX=$wrapper SHMPROM_NO_PROCTITLE=1 prove -v "$t" >"$VG_DIR/$name.prove.log" 2>&1
        rc=$?
        mkdir -p "$VG_DIR/$name"
        mv "$VG_DIR"/nginx.*.vg "$VG_DIR/$name/" 2>/dev/null
        n=$(ls "$VG_DIR/$name"/*.vg 2>/dev/null | wc -l)
        echo "$t under memcheck: prove exit $rc in $((SECONDS - start)) s, $n nginx processes traced ($(grep -h '^Result:' "$VG_DIR/$name.prove.log"))"
        [[ $rc == 0 ]] || say "  (a test failing under valgrind may be timing: $VG_DIR/$name.prove.log)"
        (( n > 0 )) || { say "  no valgrind logs: nginx did not run under valgrind"; status=2; continue; }
        analyse "$VG_DIR/$name"/*.vg || status=1
    done
fi

echo "logs in $VG_DIR"
exit $status
