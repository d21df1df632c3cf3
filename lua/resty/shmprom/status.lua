-- resty.shmprom.status: the built-in status page of the metrics listener.
--
--   location = /status      { content_by_lua_block {
--       require("resty.shmprom.status").serve(gateway_or_metrics) } }
--   location = /status.json { ...same... }
--
-- serve(obj) answers
--   * JSON when the URI ends in ".json" or the query has format=json;
--   * otherwise one self-contained HTML page (inline CSS and JS, no external
--     assets) that polls the JSON every 2 seconds.
--
-- `obj` is a shmprom metrics object (anything with :metric_data()), or a
-- gateway preset object holding one (field `metrics`, `m`, `prom` or
-- `shmprom`, or a method :metrics() returning it), or a function returning
-- Prometheus text. The numbers are read from the same zone as /metrics: the
-- exposition text is parsed here (cheap enough for a status page, and never
-- on the request hot path).
--
-- The JSON holds cumulative totals and the server clock; the page computes
-- per-second rates and recent latency quantiles from the difference between
-- two successive polls. That is correct whichever worker answers a poll,
-- because every worker reads the same shared zone, and needs no state here.
--
-- JSON shape (version 1). Counters are totals since the zone was created;
-- quantiles are computed from the histogram buckets like Prometheus'
-- histogram_quantile (linear interpolation inside the bucket); a quantile or
-- ratio without data is null.
--
--   {
--     "version": 1,
--     "time": 1732550000.123,           server clock, seconds (ngx.now())
--     "pid": 4242,                      worker that answered
--     "totals": {
--       "requests": 1200, "errors": 3,  errors = 5xx answers
--       "error_ratio": 0.0025,
--       "received_bytes": 1048576, "sent_bytes": 2097152,
--       "in_flight": 2
--     },
--     "ops": {                          one entry per op seen
--       "read": {
--         "requests": 1000, "errors": 2, "error_ratio": 0.002,
--         "by_status": {"200": 998, "502": 2},
--         "received_bytes": 51200, "sent_bytes": 2000000,
--         "duration": {                 dfs_gateway_request_duration_seconds
--           "count": 1000, "sum": 12.5, "p50": 0.004, "p99": 0.09,
--           "buckets": [{"le": "0.001", "count": 10}, ...,
--                       {"le": "+Inf", "count": 1000}]
--         }
--       }, ...
--     },
--     "nodes": {                        one entry per storage node seen
--       "127.0.0.1:8081": {
--         "up": 1,                      dfs_gateway_node_up (null: no probe)
--         "probe_seconds": 0.0012,
--         "attempts": 400, "failures": 1, "retries": 1,
--         "failure_ratio": 0.0025,
--         "by_status": {"200": 399, "502": 1},
--         "duration": { ...as above, dfs_gateway_upstream_duration_seconds }
--       }, ...
--     },
--     "nodes_up": 3, "nodes_total": 3,
--     "connections": {"active": 3, "reading": 0, "writing": 1, "waiting": 2},
--     "zone": {
--       "bytes_used": 123456, "bytes_capacity": 33554432, "bytes_ratio": 0.0037,
--       "series": 180, "series_capacity": 65536, "series_ratio": 0.0027,
--       "fill": {"slots": 0.003, "keys": 0.002, "cells": 0.05},
--       "fill_ratio": 0.05, "fill_region": "cells",   the fullest region:
--                                     a new series is refused at 1
--       "series_by_family": {"dfs_gateway_requests_total": 12, ...},
--       "dropped": 0,                   shmprom_series_dropped_total, summed
--       "errors": 0,                    shmprom_errors_total, summed
--       "planes_in_use": 2, "planes_total": 64,
--       "spares_in_use": 0, "spares_total": 2   workers without a plane
--                                              (a reload's new ones)
--     }
--   }
--
-- Fields whose source metric is absent (a plain metrics object without the
-- gateway preset) are left out or empty ("ops": {}, "nodes": {}).
--
-- "connections" is current when `obj` is the gateway preset object: the
-- JSON is built after setting dfs_gateway_connections from $connections_*
-- (stub_status variables), as gateway.collect() does for /metrics. With a
-- bare metrics object it holds whatever the last /metrics scrape stored.

local ngx = ngx
local byte = string.byte
local sub = string.sub
local find = string.find
local gsub = string.gsub
local format = string.format
local concat = table.concat
local sort = table.sort
local tonumber = tonumber
local tostring = tostring
local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local setmetatable = setmetatable
local getmetatable = getmetatable
local error = error
local huge = math.huge
local floor = math.floor

local _M = { version = "0.1.0" }

local JSON_VERSION = 1

--------------------------------------------------------------------------
-- Prometheus text (0.0.4 or OpenMetrics) -> samples
--------------------------------------------------------------------------

local SPECIAL = {
    ["+Inf"] = huge, ["Inf"] = huge, ["+inf"] = huge, ["inf"] = huge,
    ["-Inf"] = -huge, ["-inf"] = -huge,
    ["NaN"] = 0 / 0, ["nan"] = 0 / 0,
}

local function to_number(s)
    local v = SPECIAL[s]
    if v then
        return v
    end
    return tonumber(s)
end

-- Parses the label set starting right after "{" at `pos`; returns the
-- labels table and the position after "}", or nil on malformed input.
local function parse_labels(line, pos)
    local labels = {}
    while true do
        local _, e, name = find(line, '^%s*([%a_][%w_]*)%s*=%s*"', pos)
        if not e then
            local _, e2 = find(line, "^%s*}", pos)
            if e2 then
                return labels, e2 + 1
            end
            return nil
        end
        pos = e + 1
        local buf, n = {}, 0
        while true do
            local q = find(line, '["\\]', pos)
            if not q then
                return nil
            end
            if q > pos then
                n = n + 1
                buf[n] = sub(line, pos, q - 1)
            end
            if byte(line, q) == 34 then -- closing quote
                pos = q + 1
                break
            end
            local esc = sub(line, q + 1, q + 1)
            n = n + 1
            buf[n] = esc == "n" and "\n" or esc
            pos = q + 2
        end
        labels[name] = concat(buf, "", 1, n)
        local _, e3 = find(line, "^%s*,", pos)
        if e3 then
            pos = e3 + 1
        end
    end
end

-- Returns an array of { name = ..., labels = {...}, value = number }.
-- Comment lines, blank lines and unparsable lines are skipped.
local function parse(text)
    local samples, n = {}, 0
    for line in text:gmatch("[^\n]+") do
        if byte(line, 1) ~= 35 then -- '#'
            local _, e, name = find(line, "^%s*([%a_:][%w_:]*)")
            if e then
                local labels, pos = nil, e + 1
                if byte(line, pos) == 123 then -- '{'
                    labels, pos = parse_labels(line, pos + 1)
                end
                if pos then
                    local _, _, v = find(line, "^%s*(%S+)", pos)
                    v = v and to_number(v)
                    if v then
                        n = n + 1
                        samples[n] = { name = name, labels = labels or {},
                                       value = v }
                    end
                end
            end
        end
    end
    return samples
end

_M.parse = parse

--------------------------------------------------------------------------
-- histogram quantiles
--------------------------------------------------------------------------

-- `buckets`: array of { ub = number, count = cumulative }, sorted by ub,
-- the last one +Inf. Same method as Prometheus' histogram_quantile.
local function quantile(q, buckets)
    local nb = #buckets
    if nb < 2 or buckets[nb].ub ~= huge then
        return nil
    end
    local total = buckets[nb].count
    if not (total > 0) then
        return nil
    end
    local rank = q * total
    local i = 1
    while i < nb and buckets[i].count < rank do
        i = i + 1
    end
    if i == nb then
        return buckets[nb - 1].ub
    end
    local b = buckets[i]
    if i == 1 and b.ub <= 0 then
        return b.ub
    end
    local start, below = 0, 0
    if i > 1 then
        start, below = buckets[i - 1].ub, buckets[i - 1].count
    end
    local inside = b.count - below
    if not (inside > 0) then
        return b.ub
    end
    return start + (b.ub - start) * ((rank - below) / inside)
end

_M.quantile = quantile

--------------------------------------------------------------------------
-- JSON encoding (no dependency: Debian's lua module ships no cjson)
--------------------------------------------------------------------------

local array_mt = {}

local function array(t)
    return setmetatable(t or {}, array_mt)
end

local ESC = {
    ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
    ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}

local function esc_char(c)
    return ESC[c] or format("\\u%04x", byte(c))
end

local function encode_string(s)
    return '"' .. gsub(s, '[%c"\\]', esc_char) .. '"'
end

local function encode_number(v)
    if v ~= v or v == huge or v == -huge then
        return "null"
    end
    if v == floor(v) and v > -1e15 and v < 1e15 then
        return format("%d", v)
    end
    return format("%.17g", v)
end

local encode

local function encode_table(t, buf)
    if getmetatable(t) == array_mt then
        buf[#buf + 1] = "["
        for i = 1, #t do
            if i > 1 then
                buf[#buf + 1] = ","
            end
            encode(t[i], buf)
        end
        buf[#buf + 1] = "]"
        return
    end
    local keys, n = {}, 0
    for k in pairs(t) do
        n = n + 1
        keys[n] = tostring(k)
    end
    sort(keys)
    buf[#buf + 1] = "{"
    for i = 1, n do
        local k = keys[i]
        local v = t[k]
        if v == nil then
            v = t[tonumber(k)]
        end
        if i > 1 then
            buf[#buf + 1] = ","
        end
        buf[#buf + 1] = encode_string(k)
        buf[#buf + 1] = ":"
        encode(v, buf)
    end
    buf[#buf + 1] = "}"
end

encode = function(v, buf)
    local tv = type(v)
    if tv == "table" then
        encode_table(v, buf)
    elseif tv == "string" then
        buf[#buf + 1] = encode_string(v)
    elseif tv == "number" then
        buf[#buf + 1] = encode_number(v)
    elseif tv == "boolean" then
        buf[#buf + 1] = v and "true" or "false"
    else
        buf[#buf + 1] = "null"
    end
end

function _M.encode_json(v)
    local buf = {}
    encode(v, buf)
    return concat(buf)
end

--------------------------------------------------------------------------
-- samples -> status table
--------------------------------------------------------------------------

local function ratio(a, b)
    if b and b > 0 and a then
        return a / b
    end
    return nil
end

local function add(t, k, v)
    t[k] = (t[k] or 0) + v
end

local function entry(tab, key, new)
    local e = tab[key]
    if not e then
        e = new()
        tab[key] = e
    end
    return e
end

local function new_hist()
    return { buckets = {}, count = 0, sum = 0 }
end

local function new_op()
    return { requests = 0, errors = 0, by_status = {}, received_bytes = 0,
             sent_bytes = 0, duration = new_hist() }
end

local function new_node()
    return { attempts = 0, failures = 0, retries = 0, by_status = {},
             duration = new_hist() }
end

-- histogram accumulator -> JSON form with quantiles
local function finish_hist(h)
    local list, n = {}, 0
    for le, count in pairs(h.buckets) do
        local ub = to_number(le)
        if ub then
            n = n + 1
            list[n] = { ub = ub, le = le, count = count }
        end
    end
    sort(list, function(a, b) return a.ub < b.ub end)
    local out = array()
    for i = 1, n do
        out[i] = { le = list[i].le, count = list[i].count }
    end
    return {
        count = h.count, sum = h.sum, buckets = out,
        p50 = quantile(0.5, list), p99 = quantile(0.99, list),
    }
end

-- The sample handlers, by metric name.
local H = {}

H.dfs_gateway_requests_total = function(s, st)
    local l = s.labels
    local op = entry(st.ops, l.op or "other", new_op)
    op.requests = op.requests + s.value
    local code = l.status or "-"
    add(op.by_status, code, s.value)
    if byte(code, 1) == 53 then -- '5'
        op.errors = op.errors + s.value
    end
end

-- The _bucket, _count and _sum handlers of a duration histogram kept per
-- op or per node: st[tbl][label value].duration.
local function duration_handlers(prefix, tbl, label, default, new)
    local function dur(s, st)
        return entry(st[tbl], s.labels[label] or default, new).duration
    end
    H[prefix .. "_bucket"] = function(s, st)
        local le = s.labels.le
        if le then
            add(dur(s, st).buckets, le, s.value)
        end
    end
    H[prefix .. "_count"] = function(s, st)
        local h = dur(s, st)
        h.count = h.count + s.value
    end
    H[prefix .. "_sum"] = function(s, st)
        local h = dur(s, st)
        h.sum = h.sum + s.value
    end
end

duration_handlers("dfs_gateway_request_duration_seconds", "ops", "op", "other",
                  new_op)

H.dfs_gateway_received_bytes_total = function(s, st)
    local op = entry(st.ops, s.labels.op or "other", new_op)
    op.received_bytes = op.received_bytes + s.value
end

H.dfs_gateway_sent_bytes_total = function(s, st)
    local op = entry(st.ops, s.labels.op or "other", new_op)
    op.sent_bytes = op.sent_bytes + s.value
end

H.dfs_gateway_requests_in_flight = function(s, st)
    st.in_flight = (st.in_flight or 0) + s.value
end

H.dfs_gateway_connections = function(s, st)
    add(st.connections, s.labels.state or "unknown", s.value)
end

H.dfs_gateway_upstream_attempts_total = function(s, st)
    local node = entry(st.nodes, s.labels.node or "-", new_node)
    node.attempts = node.attempts + s.value
    add(node.by_status, s.labels.status or "-", s.value)
end

H.dfs_gateway_upstream_failures_total = function(s, st)
    local node = entry(st.nodes, s.labels.node or "-", new_node)
    node.failures = node.failures + s.value
end

H.dfs_gateway_upstream_retries_total = function(s, st)
    local node = entry(st.nodes, s.labels.node or "-", new_node)
    node.retries = node.retries + s.value
end

duration_handlers("dfs_gateway_upstream_duration_seconds", "nodes", "node",
                  "-", new_node)

H.dfs_gateway_node_up = function(s, st)
    local node = entry(st.nodes, s.labels.node or "-", new_node)
    -- several probers: the node is up if any of them finds it up
    if not node.up or s.value > node.up then
        node.up = s.value
    end
end

H.dfs_gateway_node_probe_duration_seconds = function(s, st)
    local node = entry(st.nodes, s.labels.node or "-", new_node)
    node.probe_seconds = s.value
end

-- A handler adding each sample to the zone field that `keys` names for
-- the value of its label `label` (others are left out).
local function zone_by(label, keys)
    return function(s, st)
        local k = keys[s.labels[label]]
        if k then
            add(st.zone, k, s.value)
        end
    end
end

H.shmprom_zone_bytes = zone_by("type", { used = "bytes_used",
                                         capacity = "bytes_capacity" })

H.shmprom_zone_fill_ratio = function(s, st)
    local r = s.labels.region
    if r then
        st.zone.fill = st.zone.fill or {}
        st.zone.fill[r] = s.value
    end
end

H.shmprom_series = function(s, st)
    add(st.zone, "series", s.value)
    add(st.zone.series_by_family, s.labels.family or "", s.value)
end

H.shmprom_series_capacity = function(s, st)
    add(st.zone, "series_capacity", s.value)
end

H.shmprom_series_dropped_total = function(s, st)
    add(st.zone, "dropped", s.value)
end

H.shmprom_errors_total = function(s, st)
    add(st.zone, "errors", s.value)
end

H.shmprom_planes = zone_by("state", { in_use = "planes_in_use",
                                      total = "planes_total" })

H.shmprom_plane_spares = zone_by("state", { in_use = "spares_in_use",
                                            total = "spares_total" })

-- Builds the status table (see the JSON shape above) from exposition text.
function _M.build(text, now)
    local st = { ops = {}, nodes = {}, connections = {},
                 zone = { series_by_family = {} } }
    local samples = parse(text)
    for i = 1, #samples do
        local s = samples[i]
        local h = H[s.name]
        if h then
            h(s, st)
        end
    end

    local totals = { requests = 0, errors = 0, received_bytes = 0,
                     sent_bytes = 0, in_flight = st.in_flight or 0 }
    for _, op in pairs(st.ops) do
        op.error_ratio = ratio(op.errors, op.requests)
        op.duration = finish_hist(op.duration)
        totals.requests = totals.requests + op.requests
        totals.errors = totals.errors + op.errors
        totals.received_bytes = totals.received_bytes + op.received_bytes
        totals.sent_bytes = totals.sent_bytes + op.sent_bytes
    end
    totals.error_ratio = ratio(totals.errors, totals.requests)

    local up, total = 0, 0
    for _, node in pairs(st.nodes) do
        node.failure_ratio = ratio(node.failures, node.attempts)
        node.duration = finish_hist(node.duration)
        total = total + 1
        if node.up and node.up > 0 then
            up = up + 1
        end
    end

    local z = st.zone
    z.bytes_ratio = ratio(z.bytes_used, z.bytes_capacity)
    z.series_ratio = ratio(z.series, z.series_capacity)
    for region, r in pairs(z.fill or {}) do
        if not z.fill_ratio or r > z.fill_ratio then
            z.fill_ratio, z.fill_region = r, region
        end
    end
    z.dropped = z.dropped or 0
    z.errors = z.errors or 0

    return {
        version = JSON_VERSION,
        time = now,
        totals = totals,
        ops = st.ops,
        nodes = st.nodes,
        nodes_up = up,
        nodes_total = total,
        connections = st.connections,
        zone = z,
    }
end

--------------------------------------------------------------------------
-- serving
--------------------------------------------------------------------------

local HOLDERS = { "metrics", "m", "prom", "shmprom" }

local function has_metric_data(o)
    return type(o) == "table" and type(o.metric_data) == "function"
end

-- Returns a function that yields the exposition text, or nil.
local function text_source(obj)
    if type(obj) == "function" then
        return obj
    end
    if type(obj) ~= "table" then
        return nil
    end
    if has_metric_data(obj) then
        return function() return obj:metric_data() end
    end
    for _, k in ipairs(HOLDERS) do
        local inner = obj[k]
        if type(inner) == "function" then
            local ok, res = pcall(inner, obj)
            if ok and has_metric_data(res) then
                inner = res
            end
        end
        if has_metric_data(inner) then
            return function() return inner:metric_data() end
        end
    end
    return nil
end

local function wants_json()
    local uri = ngx.var.uri or ""
    if sub(uri, -5) == ".json" then
        return true
    end
    local fmt = ngx.var.arg_format
    return fmt == "json"
end

-- The states of dfs_gateway_connections, each read from the stub_status
-- variable $connections_<state>.
local CONNECTION_STATES = { "active", "reading", "writing", "waiting" }

-- When `obj` is a gateway preset object (resty.shmprom.gateway), sets its
-- dfs_gateway_connections gauge from this nginx's stub_status variables,
-- as gateway.collect() does before rendering /metrics: otherwise the JSON
-- would show the values of the last /metrics scrape, however old. The
-- gateway object has no method that only refreshes the gauge (collect()
-- also prints the exposition), so the family is set here directly. A
-- variable that is not there (nginx without stub_status) is skipped.
local function refresh_connections(obj)
    if type(obj) ~= "table" then
        return
    end
    local families = obj.families
    local fam = type(families) == "table" and families.connections
    if type(fam) ~= "table" or type(fam.set) ~= "function" then
        return
    end
    local var = ngx.var
    for i = 1, #CONNECTION_STATES do
        local state = CONNECTION_STATES[i]
        local v = tonumber(var["connections_" .. state])
        if v then
            fam:set(v, { state })
        end
    end
end

_M.refresh_connections = refresh_connections

-- Returns the status table for `obj`, or nil and an error string.
function _M.snapshot(obj)
    local src = text_source(obj)
    if not src then
        return nil, "no metrics object"
    end
    refresh_connections(obj)
    local ok, text, err = pcall(src)
    if not ok then
        return nil, tostring(text)
    end
    if type(text) ~= "string" then
        return nil, "metric_data() failed: " .. tostring(err)
    end
    ngx.update_time()
    local st = _M.build(text, ngx.now())
    st.pid = ngx.worker.pid()
    return st
end

local PAGE -- the HTML page, defined at the end of the file

function _M.serve(obj)
    if not text_source(obj) then
        error("resty.shmprom.status.serve: expected a shmprom metrics "
              .. "object (with :metric_data()), a gateway object holding "
              .. "one, or a function returning exposition text", 2)
    end

    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(405)
    end

    ngx.header["Cache-Control"] = "no-store"

    if not wants_json() then
        ngx.header["Content-Type"] = "text/html; charset=utf-8"
        ngx.print(PAGE)
        return
    end

    ngx.header["Content-Type"] = "application/json"
    local st, err = _M.snapshot(obj)
    if not st then
        ngx.status = 500
        ngx.log(ngx.ERR, "shmprom status: ", err)
        ngx.print(_M.encode_json({ version = JSON_VERSION, error = err }))
        return
    end
    ngx.print(_M.encode_json(st))
end

--------------------------------------------------------------------------
-- the page: inline CSS and JS, polls ?format=json every 2 s.
-- Every number shown sits in an element with data-k (its JSON path, or
-- "rate.*" for values computed in the page) and data-v (the raw number),
-- so tests can compare the page with the JSON.
--------------------------------------------------------------------------

PAGE = [==[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shmprom status</title>
<style>
:root { --bg:#f5f6f8; --fg:#1c2230; --mut:#687182; --card:#fff;
  --line:#e2e5ea; --ok:#1a7f37; --bad:#cf222e; --warn:#b08800;
  --a:#2f6feb; --b:#cf222e; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#0e1116; --fg:#e4e7eb; --mut:#98a1ad; --card:#161a21;
    --line:#2a3039; --a:#58a6ff; --b:#ff7b72; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap;
  padding: 14px 20px; border-bottom: 1px solid var(--line);
  background: var(--card); }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 15px; margin: 22px 0 8px; }
#state { color: var(--mut); }
#state.err { color: var(--bad); }
main { padding: 4px 20px 24px; max-width: 1400px; }
.cards { display: grid; gap: 12px; margin-top: 16px;
  grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); }
.card { background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; padding: 10px 14px; }
.card .k { color: var(--mut); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .v { font-size: 24px; font-weight: 600;
  font-variant-numeric: tabular-nums; }
.wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { width: 100%; border-collapse: collapse; background: var(--card); }
th, td { padding: 6px 10px; text-align: right; white-space: nowrap;
  border-bottom: 1px solid var(--line); font-variant-numeric: tabular-nums; }
th { color: var(--mut); font-weight: 500; font-size: 12px; }
th:first-child, td:first-child { text-align: left; }
tr:last-child td { border-bottom: 0; }
.up { color: var(--ok); font-weight: 600; }
.down { color: var(--bad); font-weight: 600; }
.hot { color: var(--bad); }
.empty { color: var(--mut); padding: 10px; }
.bar { height: 10px; background: var(--line); border-radius: 5px;
  overflow: hidden; margin: 6px 0 2px; }
.bar > i { display: block; height: 100%; background: var(--a); width: 0; }
.bar.warn > i { background: var(--warn); }
.bar.full > i { background: var(--bad); }
canvas { width: 100%; height: 140px; display: block; background: var(--card);
  border: 1px solid var(--line); border-radius: 8px; }
.legend { color: var(--mut); font-size: 12px; }
.legend b { display: inline-block; width: 10px; height: 3px;
  vertical-align: middle; margin: 0 4px 0 10px; }
.grid2 { display: grid; gap: 12px;
  grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); }
</style>
</head>
<body>
<header>
  <h1>shmprom status</h1>
  <span id="state">connecting&hellip;</span>
  <span class="legend">refreshes every 2 s &middot;
    <a href="?format=json">JSON</a></span>
</header>
<main>
<section class="cards">
  <div class="card"><div class="k">Operations / s</div>
    <div class="v" id="c-ops" data-k="rate.requests">&ndash;</div></div>
  <div class="card"><div class="k">5xx ratio (last 2 s)</div>
    <div class="v" id="c-err-now" data-k="rate.error_ratio">&ndash;</div></div>
  <div class="card"><div class="k">5xx ratio (since start)</div>
    <div class="v" id="c-err" data-k="totals.error_ratio">&ndash;</div></div>
  <div class="card"><div class="k">In flight</div>
    <div class="v" id="c-inflight" data-k="totals.in_flight">&ndash;</div></div>
  <div class="card"><div class="k">Storage nodes up</div>
    <div class="v" id="c-nodes" data-k="nodes_up">&ndash;</div></div>
  <div class="card"><div class="k">Metrics zone used</div>
    <div class="v" id="c-zone" data-k="zone.bytes_ratio">&ndash;</div></div>
</section>

<h2>Throughput</h2>
<canvas id="chart"></canvas>
<div class="legend"><b style="background:var(--a)"></b>operations/s
  <b style="background:var(--b)"></b>5xx/s (last 3 minutes)</div>

<h2>Operations</h2>
<div class="wrap"><table id="ops">
<thead><tr><th>op</th><th>ops/s</th><th>5xx/s</th><th>in B/s</th>
<th>out B/s</th><th>requests</th><th>5xx</th><th>5xx ratio</th>
<th>p50</th><th>p99</th><th>p50 (2 s)</th><th>p99 (2 s)</th></tr></thead>
<tbody></tbody></table></div>

<h2>Storage nodes</h2>
<div class="wrap"><table id="nodes">
<thead><tr><th>node</th><th>probe</th><th>probe time</th><th>attempts/s</th>
<th>failures/s</th><th>attempts</th><th>failures</th><th>retries</th>
<th>failure ratio</th><th>p50</th><th>p99</th></tr></thead>
<tbody></tbody></table></div>

<h2>Metrics zone</h2>
<div class="grid2">
  <div class="card"><div class="k">Bytes</div>
    <div class="bar" id="bar-bytes"><i></i></div>
    <span data-k="zone.bytes_used" id="z-used">&ndash;</span> of
    <span data-k="zone.bytes_capacity" id="z-cap">&ndash;</span></div>
  <div class="card"><div class="k">Series</div>
    <div class="bar" id="bar-series"><i></i></div>
    <span data-k="zone.series" id="z-series">&ndash;</span> of
    <span data-k="zone.series_capacity" id="z-scap">&ndash;</span></div>
  <div class="card"><div class="k">Fullest region (new series refused at 100 %)</div>
    <div class="bar" id="bar-fill"><i></i></div>
    <span id="z-fregion">&ndash;</span>
    <span data-k="zone.fill_ratio" id="z-fill">&ndash;</span></div>
  <div class="card"><div class="k">Dropped series &middot; update errors
    &middot; planes in use &middot; spares in use</div>
    <div class="v"><span data-k="zone.dropped" id="z-dropped">&ndash;</span>
    &middot; <span data-k="zone.errors" id="z-errors">&ndash;</span>
    &middot; <span data-k="zone.planes_in_use" id="z-planes">&ndash;</span>
    &middot; <span data-k="zone.spares_in_use" id="z-spares">&ndash;</span></div>
  </div>
</div>
</main>
<script>
"use strict";
(function () {
  var URL_JSON = location.pathname + "?format=json";
  var PERIOD = 2000, HISTORY = 90;
  var ORDER = ["read", "stat", "write", "delete", "list", "mkdir", "rename",
               "copy", "lock", "meta", "other"];
  var prev = null, history = [];

  function num(v) { return typeof v === "number" && isFinite(v); }
  function fixed(v, d) {
    var s = v.toFixed(d);
    return s.indexOf(".") < 0 ? s : s.replace(/0+$/, "").replace(/\.$/, "");
  }
  function fmtCount(v) {
    return num(v) ? Math.round(v).toLocaleString("en-US") : "\u2013";
  }
  function fmtRate(v) {
    if (!num(v)) return "\u2013";
    return v >= 100 ? fixed(v, 0) : v >= 10 ? fixed(v, 1) : fixed(v, 2);
  }
  function fmtPct(v) { return num(v) ? fixed(v * 100, 2) + " %" : "\u2013"; }
  function fmtDur(v) {
    if (!num(v)) return "\u2013";
    if (v < 0.001) return fixed(v * 1e6, 0) + " \u00b5s";
    if (v < 1) return fixed(v * 1000, v < 0.01 ? 2 : 1) + " ms";
    return fixed(v, 2) + " s";
  }
  function fmtBytes(v) {
    if (!num(v)) return "\u2013";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? fixed(v, 1) : fixed(v, 0)) + " " + u[i];
  }

  // Prometheus' histogram_quantile over [{le, count}] (cumulative).
  function quantile(q, buckets) {
    if (!buckets || buckets.length < 2) return null;
    var b = buckets.map(function (x) {
      return { ub: x.le === "+Inf" ? Infinity : parseFloat(x.le),
               count: x.count };
    });
    var n = b.length;
    if (b[n - 1].ub !== Infinity) return null;
    var total = b[n - 1].count;
    if (!(total > 0)) return null;
    var rank = q * total, i = 0;
    while (i < n - 1 && b[i].count < rank) i++;
    if (i === n - 1) return b[n - 2].ub;
    if (i === 0 && b[0].ub <= 0) return b[0].ub;
    var start = i > 0 ? b[i - 1].ub : 0, below = i > 0 ? b[i - 1].count : 0;
    var inside = b[i].count - below;
    if (!(inside > 0)) return b[i].ub;
    return start + (b[i].ub - start) * ((rank - below) / inside);
  }

  // Per-bucket difference of two cumulative bucket lists (null on reset).
  function deltaBuckets(cur, old) {
    if (!cur || !old || cur.length !== old.length) return null;
    var out = [];
    for (var i = 0; i < cur.length; i++) {
      if (cur[i].le !== old[i].le) return null;
      var d = cur[i].count - old[i].count;
      if (d < 0) return null;
      out.push({ le: cur[i].le, count: d });
    }
    return out;
  }

  function get(o, path) {
    for (var i = 0; i < path.length; i++) {
      if (o == null) return undefined;
      o = o[path[i]];
    }
    return o;
  }

  // rate of a counter at `path` between the previous and this poll
  function rate(cur, path) {
    if (!prev) return null;
    var dt = cur.time - prev.time;
    var a = get(cur, path), b = get(prev, path);
    if (!(dt > 0) || !num(a)) return null;
    if (!num(b)) b = 0;
    if (a < b) return null; // counter reset (restart)
    return (a - b) / dt;
  }

  function set(el, text, value, key) {
    el.textContent = text;
    el.setAttribute("data-v", num(value) ? String(value) : "");
    if (key) el.setAttribute("data-k", key);
    return el;
  }

  function cell(tr, text, value, key, cls) {
    var td = document.createElement("td");
    set(td, text, value, key);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function sortedKeys(obj, order) {
    return Object.keys(obj || {}).sort(function (a, b) {
      var ia = order ? order.indexOf(a) : -1, ib = order ? order.indexOf(b) : -1;
      if (ia < 0) ia = 1e9;
      if (ib < 0) ib = 1e9;
      return ia - ib || (a < b ? -1 : a > b ? 1 : 0);
    });
  }

  function emptyRow(tbody, cols, text) {
    var tr = document.createElement("tr"), td = document.createElement("td");
    td.colSpan = cols; td.className = "empty"; td.textContent = text;
    tr.appendChild(td); tbody.appendChild(tr);
  }

  function renderOps(j) {
    var tbody = document.querySelector("#ops tbody");
    tbody.textContent = "";
    var ops = sortedKeys(j.ops, ORDER);
    if (!ops.length) emptyRow(tbody, 12, "no requests yet");
    ops.forEach(function (op) {
      var o = j.ops[op], p = "ops." + op + ".", tr = document.createElement("tr");
      tr.setAttribute("data-op", op);
      cell(tr, op, null, null);
      var r = rate(j, ["ops", op, "requests"]);
      cell(tr, fmtRate(r), r, "rate." + p + "requests");
      var e = rate(j, ["ops", op, "errors"]);
      cell(tr, fmtRate(e), e, "rate." + p + "errors", e > 0 ? "hot" : "");
      var bi = rate(j, ["ops", op, "received_bytes"]);
      cell(tr, fmtBytes(bi), bi, "rate." + p + "received_bytes");
      var bo = rate(j, ["ops", op, "sent_bytes"]);
      cell(tr, fmtBytes(bo), bo, "rate." + p + "sent_bytes");
      cell(tr, fmtCount(o.requests), o.requests, p + "requests");
      cell(tr, fmtCount(o.errors), o.errors, p + "errors", o.errors > 0 ? "hot" : "");
      cell(tr, fmtPct(o.error_ratio), o.error_ratio, p + "error_ratio");
      var d = o.duration || {};
      cell(tr, fmtDur(d.p50), d.p50, p + "duration.p50");
      cell(tr, fmtDur(d.p99), d.p99, p + "duration.p99");
      var db = prev && deltaBuckets(d.buckets, get(prev, ["ops", op, "duration", "buckets"]));
      var q50 = db ? quantile(0.5, db) : null, q99 = db ? quantile(0.99, db) : null;
      cell(tr, fmtDur(q50), q50, "rate." + p + "duration.p50");
      cell(tr, fmtDur(q99), q99, "rate." + p + "duration.p99");
      tbody.appendChild(tr);
    });
  }

  function renderNodes(j) {
    var tbody = document.querySelector("#nodes tbody");
    tbody.textContent = "";
    var nodes = sortedKeys(j.nodes);
    if (!nodes.length) emptyRow(tbody, 11, "no storage node seen yet");
    nodes.forEach(function (name) {
      var n = j.nodes[name], p = "nodes." + name + ".";
      var tr = document.createElement("tr");
      tr.setAttribute("data-node", name);
      cell(tr, name, null, null);
      var state = n.up === 1 ? "UP" : n.up === 0 ? "DOWN" : "\u2013";
      cell(tr, state, n.up, p + "up", n.up === 1 ? "up" : n.up === 0 ? "down" : "");
      cell(tr, fmtDur(n.probe_seconds), n.probe_seconds, p + "probe_seconds");
      var a = rate(j, ["nodes", name, "attempts"]);
      cell(tr, fmtRate(a), a, "rate." + p + "attempts");
      var f = rate(j, ["nodes", name, "failures"]);
      cell(tr, fmtRate(f), f, "rate." + p + "failures", f > 0 ? "hot" : "");
      cell(tr, fmtCount(n.attempts), n.attempts, p + "attempts");
      cell(tr, fmtCount(n.failures), n.failures, p + "failures", n.failures > 0 ? "hot" : "");
      cell(tr, fmtCount(n.retries), n.retries, p + "retries");
      cell(tr, fmtPct(n.failure_ratio), n.failure_ratio, p + "failure_ratio");
      var d = n.duration || {};
      cell(tr, fmtDur(d.p50), d.p50, p + "duration.p50");
      cell(tr, fmtDur(d.p99), d.p99, p + "duration.p99");
      tbody.appendChild(tr);
    });
  }

  function bar(id, ratio) {
    var el = document.getElementById(id);
    var r = num(ratio) ? Math.max(0, Math.min(1, ratio)) : 0;
    el.firstElementChild.style.width = (r * 100).toFixed(1) + "%";
    el.className = "bar" + (r > 0.9 ? " full" : r > 0.8 ? " warn" : "");
    el.setAttribute("data-v", num(ratio) ? String(ratio) : "");
  }

  function renderZone(j) {
    var z = j.zone || {};
    set(document.getElementById("z-used"), fmtBytes(z.bytes_used), z.bytes_used);
    set(document.getElementById("z-cap"), fmtBytes(z.bytes_capacity), z.bytes_capacity);
    set(document.getElementById("z-series"), fmtCount(z.series), z.series);
    set(document.getElementById("z-scap"), fmtCount(z.series_capacity), z.series_capacity);
    set(document.getElementById("z-dropped"), fmtCount(z.dropped), z.dropped);
    set(document.getElementById("z-errors"), fmtCount(z.errors), z.errors);
    set(document.getElementById("z-planes"), fmtCount(z.planes_in_use), z.planes_in_use);
    set(document.getElementById("z-spares"), fmtCount(z.spares_in_use), z.spares_in_use);
    set(document.getElementById("z-fregion"), z.fill_region || "\u2013", z.fill_region);
    set(document.getElementById("z-fill"), fmtPct(z.fill_ratio), z.fill_ratio);
    bar("bar-bytes", z.bytes_ratio);
    bar("bar-series", z.series_ratio);
    bar("bar-fill", z.fill_ratio);
  }

  function renderCards(j) {
    var t = j.totals || {};
    var r = rate(j, ["totals", "requests"]), e = rate(j, ["totals", "errors"]);
    set(document.getElementById("c-ops"), fmtRate(r), r);
    var er = num(r) && r > 0 && num(e) ? e / r : null;
    set(document.getElementById("c-err-now"), fmtPct(er), er);
    set(document.getElementById("c-err"), fmtPct(t.error_ratio), t.error_ratio);
    set(document.getElementById("c-inflight"), fmtCount(t.in_flight), t.in_flight);
    var nodes = document.getElementById("c-nodes");
    set(nodes, j.nodes_total ? j.nodes_up + " / " + j.nodes_total : "\u2013", j.nodes_up);
    nodes.className = "v" + (j.nodes_up < j.nodes_total ? " down" : "");
    var z = j.zone || {};
    set(document.getElementById("c-zone"), fmtPct(z.bytes_ratio), z.bytes_ratio);
    if (num(r)) {
      history.push({ ops: r, err: num(e) ? e : 0 });
      if (history.length > HISTORY) history.shift();
    }
  }

  function drawChart() {
    var c = document.getElementById("chart");
    var dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    var g = c.getContext("2d");
    g.scale(dpr, dpr);
    g.clearRect(0, 0, w, h);
    var css = getComputedStyle(document.documentElement);
    var max = 0;
    history.forEach(function (p) { max = Math.max(max, p.ops, p.err); });
    if (!(max > 0)) max = 1;
    var pad = 8, step = (w - 2 * pad) / (HISTORY - 1);
    g.fillStyle = css.getPropertyValue("--mut");
    g.font = "11px system-ui, sans-serif";
    g.fillText(fmtRate(max) + "/s", pad, 12);
    function line(key, color) {
      g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
      var x0 = pad + (HISTORY - history.length) * step;
      history.forEach(function (p, i) {
        var x = x0 + i * step, y = h - pad - (p[key] / max) * (h - 2 * pad - 10);
        if (i) g.lineTo(x, y); else g.moveTo(x, y);
      });
      g.stroke();
    }
    line("ops", css.getPropertyValue("--a").trim() || "#2f6feb");
    line("err", css.getPropertyValue("--b").trim() || "#cf222e");
  }

  function render(j) {
    renderCards(j);
    renderOps(j);
    renderNodes(j);
    renderZone(j);
    drawChart();
    var st = document.getElementById("state");
    st.className = "";
    st.textContent = "updated " + new Date(j.time * 1000).toLocaleTimeString()
      + " \u00b7 worker " + j.pid;
    document.body.setAttribute("data-time", String(j.time));
  }

  function poll() {
    var xhr = new XMLHttpRequest();
    xhr.open("GET", URL_JSON, true);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.onload = function () {
      try {
        if (xhr.status !== 200) throw new Error("HTTP " + xhr.status);
        var j = JSON.parse(xhr.responseText);
        render(j);
        prev = j;
      } catch (err) { fail(err); }
      setTimeout(poll, PERIOD);
    };
    xhr.onerror = function () { fail(new Error("unreachable")); setTimeout(poll, PERIOD); };
    xhr.send();
  }

  function fail(err) {
    var st = document.getElementById("state");
    st.className = "err";
    st.textContent = "error: " + err.message;
  }

  window.addEventListener("resize", drawChart);
  poll();
})();
</script>
</body>
</html>
]==]

return _M
