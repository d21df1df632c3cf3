-- Bench (b) and bench/log-callgrind.sh: the README example's metrics and
-- its log code as a function (README.md, "A complete example": LuaJIT
-- compiles a function called on every request, never the code of a
-- *_by_lua_block chunk), and a function doing the same reads and
-- recording nothing.

local _M = {}

-- nginx-lua-prometheus's default buckets (19; each library adds +Inf):
-- the same metric set for shmprom and the peer
_M.BUCKETS = require("shmprom_bench.fill").BUCKETS19

-- where log_vars keeps what it read, so that the compiler cannot drop the
-- reads
local sink = {}

--- metrics(lib) -> requests, latency
-- The example's two metrics (requests by host and status, latency by host)
-- defined in `lib`: a shmprom zone or an nginx-lua-prometheus instance,
-- whose counter() and histogram() take the same arguments.
function _M.metrics(lib)
    local requests = lib:counter("nginx_http_requests_total",
        "Number of HTTP requests", { "host", "status" })
    local latency = lib:histogram("nginx_http_request_duration_seconds",
        "HTTP request latency", { "host" }, _M.BUCKETS)
    return requests, latency
end

--- setup(m) -> requests, latency, log_request, log_vars
-- Defines the example's two metrics in zone `m` (requests by host and
-- status, latency by host) and returns them with the two log functions.
function _M.setup(m)
    local requests, latency = _M.metrics(m)

    local function log_request()
        local host = ngx.var.host
        requests:inc(1, host, ngx.status)
        latency:observe(ngx.now() - ngx.req.start_time(), host)
    end

    local function log_vars()
        local host = ngx.var.host
        local status, rt = ngx.status, ngx.now() - ngx.req.start_time()
        sink.host, sink.status, sink.rt = host, status, rt
    end

    return requests, latency, log_request, log_vars
end

return _M
