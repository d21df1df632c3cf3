-- resty.shmprom.gateway: the metrics preset for an nginx/OpenResty web
-- gateway (WebDAV/HTTP) in front of the storage nodes of a distributed file
-- system. Built only on the public Lua API of resty.shmprom
-- (docs/contract.md); one line per nginx phase, plus two maps:
--
--   init_by_lua_block {
--       gateway = require("resty.shmprom.gateway").init{
--           zone = "dfs_gateway", size = "64m",
--           nodes = { "127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083" },
--           probe_interval = 1, probe_path = "/", probe_timeout = 1,
--       }
--   }
--   init_worker_by_lua_block { gateway.init_worker() }
--   map "" $dfs_gateway_begun { default ""; }             -- http block,
--   map "" $dfs_gateway_log { default "<LOG_MAP>"; }      -- see below
--   set_by_lua_block $dfs_gateway_begun { return gateway.begin() }
--                                   -- gateway server, first: in-flight +1
--   log_by_lua_block         { gateway.log() }      -- everything else
--   content_by_lua_block     { gateway.collect() }  -- on the /metrics listener
--
-- <LOG_MAP> is _M.LOG_MAP, exactly:
--   $dfs_gateway_begun $request_length $bytes_sent $body_bytes_sent
--   $request_completion|$upstream_addr|$upstream_status|
--   $upstream_response_time                         (one line, no breaks)
-- log() reads that one variable instead of six or seven: every ngx.var
-- read is a round trip through nginx's variable lookup (by name, hashed,
-- then copied into a new Lua string) that costs more than a metric update.
--
-- Families (prefix dfs_gateway_), as in docs/contract.md:
--   requests_total{op,status}, request_duration_seconds{op},
--   received_bytes_total{op}, sent_bytes_total{op}, object_size_bytes{op},
--   requests_in_flight, upstream_attempts_total{node,status},
--   upstream_failures_total{node}, upstream_retries_total{node},
--   upstream_duration_seconds{node}, node_up{node},
--   node_probe_duration_seconds{node}, connections{state}.
--
-- What is measured, exactly:
--   op           from the method; PROPFIND by its Depth header (0 = stat,
--                1, infinity, empty or absent = list); unknown methods =
--                other.
--   status       ngx.status at log time (what the client got, 499 included).
--   duration     ngx.now() - ngx.req.start_time() (the clock $request_time
--                uses, millisecond resolution).
--   received     $request_length (request line, headers and body as read).
--   sent         $bytes_sent (status line, headers and body as sent).
--   object size  write: the request body size, from $content_length, on a
--                2xx reply. nginx sets $content_length to the size of the
--                body it read, also for a chunked body once the body was
--                buffered (proxy_request_buffering on), so it is exact; a
--                write without a known body size is not observed.
--                read: $body_bytes_sent of a 200 or 206 reply, only when
--                $request_completion is "OK" (an aborted download would
--                otherwise report a partial size); for 206 that is the size
--                of the range served.
--   upstream     per entry of $upstream_addr / $upstream_status /
--                $upstream_response_time (", " between attempts, " : "
--                between internal redirects or upstream groups; entries at the
--                same position belong together): one attempt{node,status},
--                a failure when the status is 5xx or "-", a retry against the
--                node when nginx made another attempt after it in the same
--                group, the response time in the node's histogram. When no
--                node is left to try nginx reports the upstream group's name
--                as the address: that name becomes the node label.
--   in flight    from the server rewrite phase to the log phase of the
--                requests that reach the server rewrite phase: begin() (in
--                set_by_lua, no coroutine, no ngx.ctx) adds 1 and returns
--                "1" into $dfs_gateway_begun; log() takes 1 away only when
--                that variable is "1". Requests nginx rejects while reading
--                the request header (400, 408, 414, 431/494) never reach
--                that phase and are not counted in flight (they are in
--                requests_total). Variables survive internal redirects
--                (error_page, try_files, ngx.exec): after one, begin() runs
--                again in the server rewrite phase and does not count the
--                request twice. The gauge is livesum: a worker that exits or
--                is killed takes its requests with it. Subrequests share
--                their parent's variables: keep log_subrequest off (the
--                default) in the gateway server, or a subrequest's log phase
--                would take the parent out of flight and read the parent's
--                $dfs_gateway_log before it is final.
--
-- The per-request code reads one nginx variable (two for a 2xx PUT or a
-- PROPFIND), keeps one series handle per label set in worker-local tables
-- (a miss asks the core once), and uses no pairs/ipairs and no string
-- patterns.

local shmprom = require "resty.shmprom"

local ngx = ngx
local var = ngx.var
local get_method = ngx.req.get_method
local start_time = ngx.req.start_time
local is_internal = ngx.req.is_internal
local get_phase = ngx.get_phase
local now = ngx.now
local tonumber = tonumber
local type = type
local error = error
local tostring = tostring
local find = string.find
local sub = string.sub
local byte = string.byte
local pairs = pairs
local setmetatable = setmetatable

local _M = { _VERSION = "0.1.0" }

_M.PREFIX = "dfs_gateway_"

-- the value of the $dfs_gateway_log map that log() parses (see the top)
_M.LOG_MAP = "$dfs_gateway_begun $request_length $bytes_sent"
    .. " $body_bytes_sent $request_completion"
    .. "|$upstream_addr|$upstream_status|$upstream_response_time"

-- seconds; the request and upstream duration histograms
_M.DURATION_BUCKETS = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    30, 60,
}

-- bytes; 1 KiB .. 4 GiB by powers of 4
_M.SIZE_BUCKETS = {
    1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
    268435456, 1073741824, 4294967296,
}

-- method -> op; PROPFIND is decided by its Depth header, the rest is "other"
local OPS = {
    GET = "read", HEAD = "stat", PUT = "write", DELETE = "delete",
    MKCOL = "mkdir", MOVE = "rename", COPY = "copy",
    LOCK = "lock", UNLOCK = "lock",
    PROPPATCH = "meta", OPTIONS = "meta",
}
_M.OPS = OPS
_M.OP_NAMES = {
    "read", "stat", "write", "delete", "list", "mkdir", "rename", "copy",
    "lock", "meta", "other",
}

-- the op of a method and its Depth header value (nil when absent)
local function classify(method, depth)
    local op = OPS[method]
    if op then
        return op
    end
    if method == "PROPFIND" then
        if depth == "0" then
            return "stat"
        end
        return "list"
    end
    return "other"
end
_M.classify = classify

-- zone, size, lib, path, planes, prefault, prefault_ahead and
-- cells_per_series go to shmprom.new as they are
local OPTION_NAMES = {
    zone = true, size = true, lib = true, path = true, planes = true,
    prefault = true, prefault_ahead = true, cells_per_series = true,
    nodes = true,
    probe_interval = true, probe_timeout = true, probe_path = true,
    probe_method = true, module = true,
}

local PROBE_METHODS = { OPTIONS = true, HEAD = true, GET = true }

local function check_node(node, i)
    if type(node) ~= "string" or node == "" then
        return "nodes[" .. i .. "] must be a \"host:port\" string"
    end
    if find(node, "[%s%c]") then
        return "nodes[" .. i .. "] has white space: \"" .. node .. "\""
    end
    if sub(node, 1, 5) == "unix:" then
        if #node < 6 then
            return "nodes[" .. i .. "]: unix: needs a socket path"
        end
        return nil
    end
    local host, port = node:match("^(.+):(%d+)$")
    port = tonumber(port)
    if not host or not port or port < 1 or port > 65535 then
        return "nodes[" .. i .. "] must be \"host:port\" (as nginx writes it"
               .. " in $upstream_addr), got \"" .. node .. "\""
    end
    return nil
end

-- split "host:port" / "[v6]:port" / "unix:/path" for the probe's connect()
local function node_endpoint(node)
    if sub(node, 1, 5) == "unix:" then
        return node, nil
    end
    local host, port = node:match("^(.+):(%d+)$")
    if sub(host, 1, 1) == "[" and sub(host, -1) == "]" then
        host = sub(host, 2, -2)
    end
    return host, tonumber(port)
end

local function check_options(opts)
    if type(opts) ~= "table" then
        return "options must be a table"
    end
    for k in pairs(opts) do
        if not OPTION_NAMES[k] then
            return "unknown option \"" .. tostring(k) .. "\""
        end
    end
    if opts.zone ~= nil and (type(opts.zone) ~= "string" or opts.zone == "")
    then
        return "zone must be a non-empty string"
    end
    local nodes = opts.nodes
    if nodes ~= nil then
        if type(nodes) ~= "table" then
            return "nodes must be a list of \"host:port\" strings"
        end
        local n = #nodes
        for k in pairs(nodes) do
            if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then
                return "nodes must be a list (array), not a map"
            end
        end
        local seen = {}
        for i = 1, n do
            local err = check_node(nodes[i], i)
            if err then
                return err
            end
            if seen[nodes[i]] then
                return "node \"" .. nodes[i] .. "\" is listed twice"
            end
            seen[nodes[i]] = true
        end
    end
    for _, k in pairs({ "probe_interval", "probe_timeout" }) do
        local v = opts[k]
        if v ~= nil and (type(v) ~= "number" or not (v > 0) or v == 1 / 0)
        then
            return k .. " must be a positive number of seconds"
        end
    end
    local path = opts.probe_path
    if path ~= nil and (type(path) ~= "string" or sub(path, 1, 1) ~= "/"
                        or find(path, "[%s%c]")) then
        return "probe_path must be a path starting with \"/\" and"
               .. " without white space"
    end
    if opts.module ~= nil and type(opts.module) ~= "boolean" then
        return "module must be true or false"
    end
    local method = opts.probe_method
    if method ~= nil and not PROBE_METHODS[method] then
        return "probe_method must be \"OPTIONS\", \"HEAD\" or \"GET\""
    end
    return nil
end

-- two-level cache of series handles: cache[a][b] = fam:labels(a, b)
local function series2(cache, fam, a, b)
    local t = cache[a]
    if t == nil then
        t = {}
        cache[a] = t
    end
    local s = t[b]
    if s == nil then
        s = fam:labels(a, b)
        if s then
            t[b] = s
        end
    end
    return s
end

-- one-level cache: cache[a] = fam:labels(a)
local function series1(cache, fam, a)
    local s = cache[a]
    if s == nil then
        s = fam:labels(a)
        if s then
            cache[a] = s
        end
    end
    return s
end

-- adds v (when it is a number) to the series of label value a
local function inc1(cache, fam, a, v)
    if v then
        local s = series1(cache, fam, a)
        if s then
            s:inc(v)
        end
    end
end

-- the end of the list entry starting at pos: returns the last index of the
-- entry, the index where the next entry starts (nil at the end), and whether
-- the next entry is in the same group (", ") or after " : "
local function next_entry(s, pos)
    local c = find(s, ", ", pos, true)
    local r = find(s, " : ", pos, true)
    if c and (r == nil or c < r) then
        return c - 1, c + 2, true
    end
    if r then
        return r - 1, r + 3, false
    end
    return #s, nil, false
end

-- calls fn(node, status, response_time, retried) for each entry of the
-- $upstream_addr list, with the $upstream_status / $upstream_response_time
-- entries at the same position ("-" when a list is shorter); retried is true
-- when another attempt follows in the same group (", " and not " : ")
local function walk_upstream(addr, ustatus, utime, fn)
    local pa, ps, pt = 1, 1, 1
    for _ = 1, #addr do
        local ea, na, same = next_entry(addr, pa)
        local st, tm = "-", "-"
        if ps then
            local es, ns = next_entry(ustatus, ps)
            st = sub(ustatus, ps, es)
            ps = ns
        end
        if pt then
            local et, nt = next_entry(utime, pt)
            tm = sub(utime, pt, et)
            pt = nt
        end
        fn(sub(addr, pa, ea), st, tm, same)
        if na == nil then
            return
        end
        pa = na
    end
end
_M.walk_upstream = walk_upstream

-- Hands the recorder's hooks to ngx_http_shmprom_module when nginx loaded
-- it. Returns how many servers/locations have "shmprom_gateway on" (0:
-- the Lua phase handlers record), or nil and why the module cannot be used.
local function attach_module(m, fams)
    local attach = shmprom._module_function("ngx_http_shmprom_gateway_attach",
        "int ngx_http_shmprom_gateway_attach(const shmprom_gw_hooks *hooks);")
    if not attach then
        return nil, "ngx_http_shmprom_module is not loaded (load_module)"
    end
    local hooks, err = m:gateway_hooks(fams)
    if not hooks then
        return nil, err
    end
    local n = tonumber(attach(hooks))
    if n < 0 then
        return nil, "ngx_http_shmprom_module does not take these hooks"
                    .. " (built for another libshmprom ABI, or called"
                    .. " outside init_by_lua)"
    end
    return n
end

function _M.init(opts)
    local err = check_options(opts)
    if err then
        error("resty.shmprom.gateway: " .. err, 2)
    end

    local zone = opts.zone or "dfs_gateway"
    local ok, m = pcall(shmprom.new, {
        zone = zone, size = opts.size or "64m", lib = opts.lib,
        path = opts.path, planes = opts.planes, prefault = opts.prefault,
        prefault_ahead = opts.prefault_ahead,
        cells_per_series = opts.cells_per_series,
    })
    if not ok then
        error("resty.shmprom.gateway: " .. tostring(m), 2)
    end

    local P = _M.PREFIX
    local D = _M.DURATION_BUCKETS
    local f = {
        requests = m:counter(P .. "requests_total",
            "Requests handled by the gateway, by file-system operation and"
            .. " HTTP status.", { "op", "status" }),
        duration = m:histogram(P .. "request_duration_seconds",
            "Time from the first byte of the request to the log phase, by"
            .. " operation.", { "op" }, D),
        received = m:counter(P .. "received_bytes_total",
            "Bytes received from clients (request line, headers, body), by"
            .. " operation.", { "op" }),
        sent = m:counter(P .. "sent_bytes_total",
            "Bytes sent to clients (status line, headers, body), by"
            .. " operation.", { "op" }),
        object_size = m:histogram(P .. "object_size_bytes",
            "Body size of objects written (PUT body, 2xx) and read (GET"
            .. " 200/206 body, completed).", { "op" }, _M.SIZE_BUCKETS),
        in_flight = m:gauge(P .. "requests_in_flight",
            "Requests being handled by the gateway now.", nil,
            { mode = "livesum" }),
        attempts = m:counter(P .. "upstream_attempts_total",
            "Attempts to a storage node, by node and the node's status"
            .. " (\"-\" when none).", { "node", "status" }),
        failures = m:counter(P .. "upstream_failures_total",
            "Attempts to a storage node that failed (5xx or no status).",
            { "node" }),
        retries = m:counter(P .. "upstream_retries_total",
            "Failed attempts to a storage node after which the gateway tried"
            .. " another node.", { "node" }),
        upstream_duration = m:histogram(P .. "upstream_duration_seconds",
            "Time spent on one attempt to a storage node.", { "node" }, D),
        node_up = m:gauge(P .. "node_up",
            "1 when the last active probe of the storage node got an HTTP"
            .. " reply below 500, else 0.", { "node" }),
        probe_duration = m:gauge(P .. "node_probe_duration_seconds",
            "Duration of the last active probe of the storage node.",
            { "node" }),
        connections = m:gauge(P .. "connections",
            "Client connections of this nginx by state (stub_status).",
            { "state" }),
    }

    local nodes = {}
    if opts.nodes then
        for i = 1, #opts.nodes do
            nodes[i] = opts.nodes[i]
        end
    end
    local probe_interval = opts.probe_interval or 1
    local probe_timeout = opts.probe_timeout or 1
    local probe_path = opts.probe_path or "/"
    local probe_method = opts.probe_method or "OPTIONS"

    -- worker-local caches of series handles
    local c_requests, c_duration, c_received, c_sent = {}, {}, {}, {}
    local c_object_size = {}
    local c_attempts, c_failures, c_retries, c_updur = {}, {}, {}, {}

    local f_requests, f_duration = f.requests, f.duration
    local f_received, f_sent = f.received, f.sent
    local f_object_size, f_in_flight = f.object_size, f.in_flight
    local f_attempts, f_failures = f.attempts, f.failures
    local f_retries, f_updur = f.retries, f.upstream_duration

    -- ngx_http_shmprom_module records the requests when it is loaded and
    -- "shmprom_gateway on" is set somewhere; begin() and log() then do
    -- nothing (they would count every request twice)
    local by_module = false
    if opts.module ~= false and ngx and get_phase() == "init" then
        local n, err = attach_module(m, {
            f.requests, f.duration, f.received, f.sent, f.object_size,
            f.in_flight, f.attempts, f.failures, f.retries,
            f.upstream_duration,
        })
        if n and n > 0 then
            by_module = true
        elseif opts.module then
            error("resty.shmprom.gateway: module = true but "
                  .. (err or "no server has \"shmprom_gateway on\""), 2)
        end
    elseif opts.module then
        error("resty.shmprom.gateway: module = true needs init() in"
              .. " init_by_lua", 2)
    end

    local gw = {
        metrics = m,
        families = f,
        zone = zone,
        nodes = nodes,
        module = by_module,
        options = {
            probe_interval = probe_interval, probe_timeout = probe_timeout,
            probe_path = probe_path, probe_method = probe_method,
        },
    }

    -- the counters of one attempt of the upstream lists
    local function attempt_counts(node, status, retried)
        local s = series2(c_attempts, f_attempts, node, status)
        if s then
            s:inc(1)
        end
        if status == "-" or byte(status, 1) == 53 then -- "5xx"
            inc1(c_failures, f_failures, node, 1)
        end
        if retried then
            inc1(c_retries, f_retries, node, 1)
        end
    end

    local function upstream_time(node, rt)
        local t = tonumber(rt)
        if t then
            local s = series1(c_updur, f_updur, node)
            if s then
                s:observe(t)
            end
        end
    end

    -- one attempt of the upstream lists, all its metrics
    local function attempt(node, status, rt, retried)
        attempt_counts(node, status, retried)
        upstream_time(node, rt)
    end

    local BY_MODULE = "ngx_http_shmprom_module records the requests"
        .. " (shmprom_gateway on): begin() and log() do nothing; remove"
        .. " them from the configuration"

    -- a misplaced begin()/log(): said once per worker, nothing is recorded
    local said = {}
    local function say_once(what, msg)
        if not said[what] then
            said[what] = true
            ngx.log(ngx.ERR, "resty.shmprom.gateway: ", msg)
        end
    end

    function gw.begin()
        if by_module then
            say_once("module", BY_MODULE)
            return ""
        end
        if get_phase() ~= "set" then
            say_once("begin", "begin() belongs in \"set_by_lua_block"
                     .. " $dfs_gateway_begun { return gateway.begin() }\""
                     .. " (called in the " .. get_phase() .. " phase: requests"
                     .. " in flight are not counted)")
            return ""
        end
        -- after an internal redirect the server rewrite phase runs again:
        -- the request was counted once if its first pass set the variable
        if is_internal() and var.dfs_gateway_begun == "1" then
            return "1"
        end
        f_in_flight:inc(1)
        return "1"
    end

    -- $dfs_gateway_log (a map in the nginx configuration, _M.LOG_MAP):
    -- "B RL BS BBS RC|UA|US|UT" with B = $dfs_gateway_begun, RL =
    -- $request_length, BS = $bytes_sent, BBS = $body_bytes_sent, RC =
    -- $request_completion, UA/US/UT = the upstream address/status/response
    -- time lists. One variable read instead of six or seven; the fields
    -- before "|" are numbers, "OK" or empty, the upstream lists have no
    -- "|". $content_length (a 2xx PUT) and the Depth header (PROPFIND) are
    -- read on their own, only when needed: in the map nginx would work
    -- them out for every request.
    function gw.log()
        -- Counters first, histograms last, and only these five locals
        -- live across the histograms: an observation that falls in another
        -- bucket than the one the trace was recorded with leaves the trace,
        -- and the side trace LuaJIT compiles from there inherits every slot
        -- of this frame below the call. With the parse's dozen locals still
        -- there it gives up ("NYI: register coalescing too complex") and
        -- such requests finish in the interpreter, after a new failed
        -- compile each time; the block below frees their slots.
        if by_module then
            say_once("module", BY_MODULE)
            return
        end
        local op, dt, size, node, utime
        do
            local s = var.dfs_gateway_log
            if s == nil then
                say_once("log", "log() needs the $dfs_gateway_log map of"
                         .. " nginx-conf/gateway.conf in the http block:"
                         .. " nothing is recorded")
                return
            end
            local e1 = find(s, " ", 1, true)
            if e1 == 2 then -- "1": begin() counted this request
                f_in_flight:dec(1)
            end
            local e2 = e1 and find(s, " ", e1 + 1, true)
            local e3 = e2 and find(s, " ", e2 + 1, true)
            local e4 = e3 and find(s, " ", e3 + 1, true)
            local b1 = e4 and find(s, "|", e4 + 1, true)
            local b2 = b1 and find(s, "|", b1 + 1, true)
            local b3 = b2 and find(s, "|", b2 + 1, true)
            if b3 == nil then
                say_once("format", "$dfs_gateway_log is not the map of"
                         .. " nginx-conf/gateway.conf (got \"" .. s .. "\"):"
                         .. " nothing is recorded")
                return
            end

            local method = get_method()
            op = OPS[method]
            if op == nil then
                -- the Depth header matters only for PROPFIND
                op = classify(method, method == "PROPFIND" and var.http_depth)
            end
            local status = ngx.status
            dt = now() - start_time()
            if dt < 0 then
                dt = 0
            end

            local sr = series2(c_requests, f_requests, op, status)
            if sr then
                sr:inc(1)
            end
            inc1(c_received, f_received, op, tonumber(sub(s, e1 + 1, e2 - 1)))
            inc1(c_sent, f_sent, op, tonumber(sub(s, e2 + 1, e3 - 1)))

            if op == "write" then
                if status >= 200 and status < 300 then
                    size = tonumber(var.content_length)
                end
            elseif op == "read" then
                -- request_completion is "OK" or empty
                if (status == 200 or status == 206) and b1 - e4 == 3 then
                    size = tonumber(sub(s, e3 + 1, e4 - 1))
                end
            end

            if b2 > b1 + 1 then -- $upstream_addr is set
                local addr = sub(s, b1 + 1, b2 - 1)
                local ustatus = b3 > b2 + 1 and sub(s, b2 + 1, b3 - 1) or "-"
                utime = b3 < #s and sub(s, b3 + 1) or "-"
                if find(addr, " ", 1, true) then
                    -- several attempts (rare): all their metrics now
                    walk_upstream(addr, ustatus, utime, attempt)
                else
                    -- one attempt: the common case; its time below
                    node = addr
                    attempt_counts(addr, ustatus, false)
                end
            end
        end

        if size then
            local sr = series1(c_object_size, f_object_size, op)
            if sr then
                sr:observe(size)
            end
        end
        if node then
            upstream_time(node, utime)
        end
        local sr = series1(c_duration, f_duration, op)
        if sr then
            sr:observe(dt)
        end
    end

    -- the stub_status variables, at scrape time
    local c_connections = {}
    local f_connections = f.connections
    local function set_connections(state, value)
        local s = series1(c_connections, f_connections, state)
        if s then
            s:set(tonumber(value) or 0)
        end
    end
    function gw.collect()
        set_connections("active", var.connections_active)
        set_connections("reading", var.connections_reading)
        set_connections("writing", var.connections_writing)
        set_connections("waiting", var.connections_waiting)
        return m:collect()
    end

    -- active probes of the storage nodes, run by worker 0 only

    local probe_state = {}
    gw.probe_state = probe_state -- node -> { up, duration, err, at } (worker 0)

    local function probe_once(node)
        local st = probe_state[node]
        local deadline_ms = probe_timeout * 1000
        ngx.update_time()
        local t0 = now()
        local sock = ngx.socket.tcp()
        sock:settimeout(deadline_ms)
        local ok, err = sock:connect(st.host, st.port)
        local up, code = false, nil
        if ok then
            ngx.update_time()
            local left = deadline_ms - (now() - t0) * 1000
            sock:settimeout(left > 1 and left or 1)
            ok, err = sock:send(st.request)
            if ok then
                ngx.update_time()
                left = deadline_ms - (now() - t0) * 1000
                sock:settimeout(left > 1 and left or 1)
                local line
                line, err = sock:receive("*l")
                if line then
                    code = tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
                    if code then
                        up = code < 500
                        if not up then
                            err = "status " .. code
                        end
                    else
                        err = "not an HTTP reply"
                    end
                end
            end
            sock:close()
        end
        ngx.update_time()
        return up, now() - t0, err
    end

    local function probe(premature, node)
        if premature then
            return
        end
        local st = probe_state[node]
        if st.busy then
            return
        end
        st.busy = true
        local ok, up, dt, err = pcall(probe_once, node)
        st.busy = false
        if not ok then
            ngx.log(ngx.ERR, "dfs gateway: probe of ", node, " failed: ", up)
            up, dt, err = false, 0, up
        end
        if st.up ~= up then
            if up then
                ngx.log(ngx.NOTICE, "dfs gateway: storage node ", node,
                        " is up")
            else
                ngx.log(ngx.WARN, "dfs gateway: storage node ", node,
                        " is down: ", err)
            end
        end
        st.up, st.duration, st.err, st.at = up, dt, err, now()
        st.up_series:set(up and 1 or 0)
        st.dur_series:set(dt)
    end

    local worker_started = false
    function gw.init_worker()
        if worker_started then
            return
        end
        worker_started = true
        m:init_worker()
        if ngx.worker.id() ~= 0 then
            return
        end
        for i = 1, #nodes do
            local node = nodes[i]
            local host, port = node_endpoint(node)
            local hosthdr = port and node or "localhost"
            probe_state[node] = {
                host = host, port = port,
                request = probe_method .. " " .. probe_path .. " HTTP/1.1\r\n"
                          .. "Host: " .. hosthdr .. "\r\n"
                          .. "User-Agent: shmprom-probe\r\n"
                          .. "Connection: close\r\n\r\n",
                up_series = assert(f.node_up:labels(node)),
                dur_series = assert(f.probe_duration:labels(node)),
                busy = false,
            }
            local ok, err = ngx.timer.at(0, probe, node)
            if ok then
                ok, err = ngx.timer.every(probe_interval, probe, node)
            end
            if not ok then
                ngx.log(ngx.ERR, "dfs gateway: cannot start the probe of ",
                        node, ": ", err)
            end
        end
    end

    return setmetatable(gw, { __index = _M })
end

return _M
