#!/usr/bin/env bash
# Installs what shmprom needs to build, run and test, when it is missing:
# Debian packages (apt-get update first) and Python test parsers.
# Idempotent: does nothing when everything is there.
set -euo pipefail

# `install-deps.sh run`: what `make run` needs; `install-deps.sh test`
# (the default): everything the tests and benchmarks use as well.
mode=${1:-test}
want_debs=(
  nginx-core libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core
  libnginx-mod-http-dav-ext curl nginx-dev
)
if [ "$mode" = test ]; then
  want_debs+=(
    prometheus prometheus-node-exporter prometheus-alertmanager
    rclone wrk libclang-dev clang perl binutils python3-pip
  )
  if [ "${SHMPROM_WITH_BROWSER:-1}" = 1 ]; then
    want_debs+=(chromium)
  fi
fi

missing=()
for p in "${want_debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian enables the packaged nginx site on install; stop the service it
  # may have started so it does not hold port 80 (we never use it).
  if command -v systemctl >/dev/null 2>&1; then $sudo systemctl stop nginx 2>/dev/null || true; fi
  if [ -f /run/nginx.pid ]; then $sudo kill "$(cat /run/nginx.pid)" 2>/dev/null || true; fi
fi

# The tests parse the exposition with Python's prometheus_client too.
if [ "$mode" = test ] && ! python3 -c 'import prometheus_client' 2>/dev/null; then
  echo "install-deps: pip install prometheus-client"
  python3 -m pip install -q prometheus-client 2>/dev/null ||
    python3 -m pip install -q --break-system-packages prometheus-client
fi
