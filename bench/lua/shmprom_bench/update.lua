-- Bench (a): cost per update inside nginx, with LuaJIT compiling the loop.
--
-- Each variant is one function holding one loop of n iterations; label
-- values come from small rotating sets held in locals (no string building).
-- run() times a variant with the thread CPU clock and the monotonic clock;
-- check() runs it under the LuaJIT profiler (VM state per sample) and the
-- trace event hook, to show the loop runs as compiled code.

local ffi = require "ffi"
local bit = require "bit"

local band = bit.band
local C = ffi.C
local tonumber = tonumber
local collectgarbage = collectgarbage

pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } shmprom_bench_timespec;
int clock_gettime(int clk, shmprom_bench_timespec *tp);
]])

local CLOCK_MONOTONIC = 1
local CLOCK_THREAD_CPUTIME_ID = 3
local ts = ffi.new("shmprom_bench_timespec")

local function clock_ns(clk)
    C.clock_gettime(clk, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local _M = {}

-- 15 buckets: the gateway preset's request duration buckets
_M.BUCKETS15 = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    30, 60,
}

local METHODS = { "GET", "PUT", "HEAD", "DELETE" }
local STATUSES = { "200", "404" }
-- 8 label sets of 2 values, built once
local LV2 = {}
for i = 1, 8 do
    LV2[i] = { METHODS[(i - 1) % 4 + 1], STATUSES[(i - 1) % 2 + 1] }
end
-- 4 label sets of 1 value
local LV1 = { { "read" }, { "write" }, { "stat" }, { "list" } }
-- observations spread over the buckets
local VALUES = { 0.0007, 0.003, 0.02, 0.07, 0.3, 0.9, 4, 45 }
-- the table baseline's keys (the 2 label values joined, built once)
local KEYS = {}
for i = 1, 8 do
    KEYS[i] = LV2[i][1] .. "|" .. LV2[i][2]
end

_M.LV2, _M.LV1 = LV2, LV1

-- lib objects: _M.objs[lib] = { counter =, counter2 =, handles =, gauge =,
-- hist = } filled by the nginx config (init / init_worker)
_M.objs = {}

local V = {}
_M.variants = V

V.empty = function(n)
    for _ = 1, n do
    end
end

local T = {}
for i = 1, 8 do
    T[KEYS[i]] = 0
end
V.table = function(n)
    local t, K = T, KEYS
    for i = 1, n do
        local k = K[band(i, 7) + 1]
        t[k] = t[k] + 1
    end
end

V.counter = function(n, o)
    local c, L = o.counter, LV2
    for i = 1, n do
        c:inc(1, L[band(i, 7) + 1])
    end
end

-- the README shape: a new label table per call ({a, b} in the call)
V.counter_newtable = function(n, o)
    local c, A, B = o.counter2, METHODS, STATUSES
    for i = 1, n do
        c:inc(1, { A[band(i, 3) + 1], B[band(i, 1) + 1] })
    end
end

V.handle = function(n, o)
    local H = o.handles
    for i = 1, n do
        H[band(i, 7) + 1]:inc(1)
    end
end

V.gauge = function(n, o)
    local g, L = o.gauge, LV2
    for i = 1, n do
        g:set(i, L[band(i, 7) + 1])
    end
end

V.histogram = function(n, o)
    local h, L, X = o.hist, LV1, VALUES
    for i = 1, n do
        h:observe(X[band(i, 7) + 1], L[band(i, 3) + 1])
    end
end

-- Diagnostics, not the API: the histogram's bucket search alone (15
-- buckets, the same 8 rotating values, two cell updates), as the wrapper
-- does it (linear over a Lua table) and as a binary search over an FFI
-- array would.
local DB = _M.BUCKETS15
local DNB = #DB
local DFB = ffi.new("double[16]")
for i = 1, DNB do
    DFB[i - 1] = DB[i]
end
DFB[15] = math.huge
local DCELLS = ffi.new("double[32]")
local DF = { buckets = DB, nb = DNB }

V.diag_linear = function(n)
    local f, c, X = DF, DCELLS, VALUES
    for i = 1, n do
        local v = X[band(i, 7) + 1]
        local b, nb = f.buckets, f.nb
        local k = nb
        for j = 1, nb do
            if v <= b[j] then
                k = j - 1
                break
            end
        end
        c[k] = c[k] + 1
        c[17] = c[17] + v
    end
end

-- bisection in a while loop over the Lua table (as the wrapper from
-- commit b11d254 to 291cca4)
V.diag_bisect = function(n)
    local f, c, X = DF, DCELLS, VALUES
    local rshift = bit.rshift
    for i = 1, n do
        local v = X[band(i, 7) + 1]
        local b, nb = f.buckets, f.nb
        local lo, hi = 1, nb + 1
        while lo < hi do
            local mid = rshift(lo + hi, 1)
            if v <= b[mid] then
                hi = mid
            else
                lo = mid + 1
            end
        end
        local k = lo - 1
        c[k] = c[k] + 1
        c[17] = c[17] + v
    end
end

-- unrolled: 4 fixed steps over an FFI array padded to 16 with +Inf
V.diag_binary = function(n)
    local B, c, X = DFB, DCELLS, VALUES
    for i = 1, n do
        local v = X[band(i, 7) + 1]
        local k = 0
        if v > B[k + 7] then
            k = k + 8
        end
        if v > B[k + 3] then
            k = k + 4
        end
        if v > B[k + 1] then
            k = k + 2
        end
        if v > B[k] then
            k = k + 1
        end
        c[k] = c[k] + 1
        c[17] = c[17] + v
    end
end

-- the object each variant needs from _M.objs[lib]
local NEEDS = { counter = "counter", counter_newtable = "counter2",
                handle = "handles", gauge = "gauge", histogram = "hist" }
_M.NEEDS = NEEDS

-- run(variant, n, lib) -> { cpu_ns =, wall_ns = }
function _M.run(name, n, lib)
    local f = V[name]
    local o = _M.objs[lib]
    if not f or not o then
        return nil, "unknown variant or lib"
    end
    local need = NEEDS[name]
    if need and o[need] == nil then
        return nil, "not supported by " .. lib
    end
    collectgarbage()
    collectgarbage()
    local w0 = clock_ns(CLOCK_MONOTONIC)
    local c0 = clock_ns(CLOCK_THREAD_CPUTIME_ID)
    f(n, o)
    local c1 = clock_ns(CLOCK_THREAD_CPUTIME_ID)
    local w1 = clock_ns(CLOCK_MONOTONIC)
    return { cpu_ns = c1 - c0, wall_ns = w1 - w0 }
end

-- check(variant, n, lib) -> { samples = {N=, I=, C=, G=, J=}, traces =,
-- loops =, aborts =, abort_reasons = {...} }
-- VM states of the profiler: N compiled code, I interpreter, C C function,
-- G garbage collector, J trace compiler.
function _M.check(name, n, lib)
    local f = V[name]
    local o = _M.objs[lib]
    if not f or not o then
        return nil, "unknown variant or lib"
    end
    local need = NEEDS[name]
    if need and o[need] == nil then
        return nil, "not supported by " .. lib
    end
    local jutil = require "jit.util"
    local vmdef = require "jit.vmdef"
    local res = { samples = {}, traces = 0, loops = 0, aborts = 0,
                  abort_reasons = {} }
    local function on_trace(what, tr, _, _, otr, oex)
        if what == "stop" then
            res.traces = res.traces + 1
            local info = jutil.traceinfo(tr)
            if info and info.linktype == "loop" then
                res.loops = res.loops + 1
            end
        elseif what == "abort" then
            res.aborts = res.aborts + 1
            local fmt = vmdef.traceerr[otr]
            local ok, msg = pcall(string.format, fmt or tostring(otr), oex)
            res.abort_reasons[#res.abort_reasons + 1] = ok and msg
                                                        or tostring(fmt)
        end
    end
    jit.attach(on_trace, "trace")
    local ok_prof, profile = pcall(require, "jit.profile")
    if ok_prof then
        local s = res.samples
        profile.start("i1", function(_, samples, vmstate)
            s[vmstate] = (s[vmstate] or 0) + samples
        end)
    end
    f(n, o)
    if ok_prof then
        profile.stop()
    else
        res.profile_error = tostring(profile)
    end
    jit.attach(on_trace)
    return res
end

function _M.info()
    local st = { jit.status() }
    local flags = {}
    for i = 2, #st do
        flags[#flags + 1] = tostring(st[i])
    end
    return { version = jit.version, on = st[1], flags = table.concat(flags,
             " "), arch = jit.arch }
end

return _M
