#!/usr/bin/env bash
# Builds nginx-module/ (ngx_http_shmprom_module) as a dynamic module for the
# installed nginx, against the Debian nginx-dev sources of the same version
# and with nginx's own configure flags (--with-compat), so the module's
# signature matches the binary. Output: target/release/ngx_http_shmprom_module.so
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
src=/usr/share/nginx/src
out=target/release/ngx_http_shmprom_module.so
build=target/nginx-module

if [ ! -f "$src/conf_flags" ]; then
  echo "build-module: $src missing: install the Debian package nginx-dev" >&2
  exit 1
fi

# the sources' version must be the running binary's
want=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
have=$(sed -n 's|#define NGINX_VERSION *"\(.*\)"|\1|p' "$src/src/core/nginx.h")
if [ "$want" != "$have" ]; then
  echo "build-module: nginx is $want but $src is $have" >&2
  exit 1
fi

mkdir -p "$build" target/release
stamp="$build/configured"
if [ ! -f "$stamp" ] || [ "$src/conf_flags" -nt "$stamp" ] || [ nginx-module/config -nt "$stamp" ]; then
  rm -rf "$build/src"
  cp -a "$src" "$build/src"
  # shellcheck disable=SC1091
  . "$src/conf_flags"
  (cd "$build/src" && ./configure "${NGX_CONF_FLAGS[@]}" \
      --add-dynamic-module="$root/nginx-module" >"$root/$build/configure.log" 2>&1) || {
    echo "build-module: configure failed; see $build/configure.log" >&2
    tail -20 "$build/configure.log" >&2
    exit 1
  }
  touch "$stamp"
fi
make -s -C "$build/src" -f objs/Makefile modules >"$build/make.log" 2>&1 || {
  echo "build-module: make failed; see $build/make.log" >&2
  tail -30 "$build/make.log" >&2
  exit 1
}
cp "$build/src/objs/ngx_http_shmprom_module.so" "$out.tmp"
mv "$out.tmp" "$out"
echo "build-module: $out"
