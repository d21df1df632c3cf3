# bench/lib/scratch-nginx.sh: one throw-away nginx for the checks by hand,
# bench/full-zone.sh and bench/batch-parts.sh (sourced, bash).
#
#   sn_init TAG                 sets W (a scratch prefix, /tmp/shmprom-TAG.*)
#                               and PORT (a free 127.0.0.1 port)
#   sn_head WORKERS REPO HERE   prints the config's head, up to the open
#                               `http {` block with its lua paths: REPO's
#                               lua/ and target/release/libshmprom.so, HERE's
#                               bench/lua
#   sn_start TAG URL            starts nginx with $W/nginx.conf, stops it and
#                               removes $W when the script exits, and waits
#                               (up to 10 s) until URL answers

sn_init() {
    W=$(mktemp -d "/tmp/shmprom-$1.XXXXXX")
    PORT=$(perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen=>1,LocalAddr=>"127.0.0.1",LocalPort=>0)->sockport')
    mkdir -p "$W/logs"
}

sn_head() {
    local user=
    [[ $(id -u) == 0 ]] && user='user root root;'
    cat <<EOC
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
$user
worker_processes $1;
pid $W/nginx.pid;
error_log $W/logs/error.log crit;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $W/body;
    lua_package_path "$2/lua/?.lua;$3/bench/lua/?.lua;;";
    lua_package_cpath "$2/target/release/?.so;;";
EOC
}

sn_stop() {
    [[ -f $W/nginx.pid ]] && kill "$(cat "$W/nginx.pid")"
    rm -rf "$W"
}

sn_start() {
    nginx -p "$W/" -c "$W/nginx.conf"
    trap sn_stop EXIT
    local up=
    for _ in $(seq 1 100); do
        if curl -s -o /dev/null "$2"; then up=1; break; fi
        sleep 0.1
    done
    [[ -n $up ]] || { echo "$1: nginx did not answer" >&2; cat "$W/logs/error.log" >&2; exit 1; }
}
