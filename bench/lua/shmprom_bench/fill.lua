-- Benches (c) (d) (e) (f): filling a zone with series and timing renders.
--
-- Label values: counters {route, status} = ("r000123", "200"), histograms
-- {route} = ("r000123"); created in the worker that handles the request.

local ffi = require "ffi"

local format = string.format
local tonumber = tonumber
local C = ffi.C

pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } shmprom_bench_timespec;
int clock_gettime(int clk, shmprom_bench_timespec *tp);
]])

local ts = ffi.new("shmprom_bench_timespec")
local function mono_ns()
    C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end
local function cpu_ns()
    C.clock_gettime(3, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

-- page faults taken by the calling thread so far (minor + major), from
-- getrusage(RUSAGE_THREAD); nil when the call fails
pcall(ffi.cdef, [[
typedef struct {
    long ru_utime[2]; long ru_stime[2];
    long ru_maxrss, ru_ixrss, ru_idrss, ru_isrss, ru_minflt, ru_majflt,
         ru_nswap, ru_inblock, ru_oublock, ru_msgsnd, ru_msgrcv,
         ru_nsignals, ru_nvcsw, ru_nivcsw;
} shmprom_bench_rusage;
int getrusage(int who, shmprom_bench_rusage *usage);
]])
local ru = ffi.new("shmprom_bench_rusage")
local RUSAGE_THREAD = 1
local function thread_faults()
    if C.getrusage(RUSAGE_THREAD, ru) ~= 0 then
        return nil
    end
    return tonumber(ru.ru_minflt) + tonumber(ru.ru_majflt)
end

local _M = { mono_ns = mono_ns, cpu_ns = cpu_ns, thread_faults = thread_faults }

-- the peer's default buckets (19; +Inf added by each library)
_M.BUCKETS19 = {
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1,
    1.5, 2, 3, 4, 5, 10,
}

-- families(m, prefix, label) -> counter, histogram
-- The two families benches (c) (e) (f) record,
-- `PREFIX_requests_total{LABEL,status}` and `PREFIX_duration_seconds{LABEL}`
-- with the peer's 19 buckets, defined in m: a shmprom zone or the peer's
-- prometheus object (the same calls).
function _M.families(m, prefix, label)
    return m:counter(prefix .. "_requests_total", "Requests", { label, "status" }),
           m:histogram(prefix .. "_duration_seconds", "Latency", { label },
                       _M.BUCKETS19)
end

function _M.route(i)
    return format("r%06d", i)
end

-- fill(counter, histogram, from, to) -> created, failed, seconds
-- counter:inc(1, {route, "200"}) and histogram:observe(v, {route}) for
-- routes from..to (either family may be nil)
function _M.fill(c, h, from, to)
    local t0 = mono_ns()
    local failed, err = 0, nil
    for i = from, to do
        local r = format("r%06d", i)
        if c then
            local _, e = c:inc(1, { r, "200" })
            if e then -- the peer returns nothing, shmprom nil, err
                failed = failed + 1
                err = e
            end
        end
        if h then
            -- 0.004 <= every bucket: the peer exports only buckets hit
            local _, e = h:observe(0.004, { r })
            if e then
                failed = failed + 1
                err = e
            end
        end
    end
    return { created = to - from + 1, failed = failed, err = err,
             seconds = (mono_ns() - t0) / 1e9 }
end

-- fill_short(counter, from, to): counters with 2 short label values
-- (hex of i split in two, up to 3 characters each); stops at the first
-- refusal. -> { created =, refused_at =, err = }
-- The peer's calls return nothing (its refusals go to its error metric):
-- only an error return counts as refused.
function _M.fill_short(c, from, to)
    for i = from, to do
        local a = format("%x", i % 4096)
        local b = format("%x", math.floor(i / 4096))
        local _, err = c:inc(1, { a, b })
        if err then
            return { created = i - from, refused_at = i, err = err }
        end
    end
    return { created = to - from + 1 }
end

-- fill_hist(histogram, from, to): label sets of 1 value (hex of i), one
-- observation of 0.01 each -> { failed = } (as fill_short, only an error
-- return counts)
function _M.fill_hist(h, from, to)
    local failed = 0
    for i = from, to do
        local _, err = h:observe(0.01, { format("%x", i) })
        if err then
            failed = failed + 1
        end
    end
    return { failed = failed }
end

-- render_times(zone, reps) -> { render_ms = {...}, metric_data_ms = {...},
-- bytes =, lines = }
-- render_ms: the library's render alone (shmprom_render + free, through
-- FFI); metric_data_ms: m:metric_data() (render + copy into a Lua string).
function _M.render_times(m, reps)
    local lib = ffi.load(m.lib)
    local out = ffi.new("uint8_t*[1]")
    local len = ffi.new("size_t[1]")
    local errbuf = ffi.new("char[256]")
    local r, md = {}, {}
    local bytes, lines = 0, 0
    for k = 1, reps do
        local t0 = mono_ns()
        local rc = lib.shmprom_render(m.ptr, 0, out, len, errbuf, 256)
        local t1 = mono_ns()
        if rc ~= 0 then
            return nil, "render failed: " .. ffi.string(errbuf)
        end
        bytes = tonumber(len[0])
        lib.shmprom_buf_free(out[0], len[0])
        r[k] = (t1 - t0) / 1e6
        collectgarbage()
        local t2 = mono_ns()
        local s = m:metric_data()
        local t3 = mono_ns()
        md[k] = (t3 - t2) / 1e6
        if k == reps then
            local n = 0
            for _ in s:gmatch("\n") do
                n = n + 1
            end
            lines = n
        end
        s = nil -- luacheck: ignore
        collectgarbage()
    end
    return { render_ms = r, metric_data_ms = md, bytes = bytes, lines = lines }
end

-- peer_render_times(prom, reps) -> same shape, metric_data_ms only
function _M.peer_render_times(prom, reps)
    local md = {}
    local bytes, lines = 0, 0
    for k = 1, reps do
        collectgarbage()
        local t0 = mono_ns()
        local t = prom:metric_data()
        local s = table.concat(t)
        local t1 = mono_ns()
        md[k] = (t1 - t0) / 1e6
        bytes = #s
        lines = #t
    end
    return { metric_data_ms = md, bytes = bytes, lines = lines }
end

-- A stand-in for a family's label cache, for the baselines that run (f)'s
-- batch loop without the wrapper: keep(s, v) puts s into a per-worker Lua
-- table, emptied when it reaches the size a label cache is emptied at
-- (MAX_CACHE in lua/resty/shmprom.lua).
local KEEP_MAX = 65536
local kept, nkept = {}, 0
function _M.keep(s, v)
    if nkept >= KEEP_MAX then
        kept, nkept = {}, 0
    end
    kept[s] = v
    nkept = nkept + 1
end

-- bare_batch(base, n): (f)'s batch loop with no metrics library: each
-- label set's values built as the batch builds them, the string kept.
function _M.bare_batch(base, n)
    local keep = _M.keep
    for i = base, base + n - 1 do
        local lv = { "/b/" .. i }
        keep(lv[1], i)
    end
end

return _M
