-- Stall detector: a 1 ms ngx.timer.every in each worker records the longest
-- gap between two of its ticks, by the monotonic clock (wall: includes the
-- time the worker was not scheduled at all, on a busy machine) and by the
-- worker thread's CPU clock (busy: the longest stretch the event loop ran
-- without coming back to its timers, preemption excluded).
--
--   init_worker_by_lua: require("shmprom_bench.stall").start("stall", 0.001)
--   /stall/reset: S.reset()   (a new measuring window for every worker)
--   /stall/read:  S.read()    -> { wall = { ms per worker }, cpu = { ... } }
-- Needs `lua_shared_dict stall 1m;`.

local F = require "shmprom_bench.fill"

local mono_ns = F.mono_ns
local cpu_ns = F.cpu_ns
local _M = {}

local dict

function _M.start(dict_name, interval)
    dict = ngx.shared[dict_name]
    local id = ngx.worker.id()
    local my_gen, maxgap, maxcpu, last, lastcpu = -1, 0, 0, 0, 0
    local function tick(premature)
        if premature then
            return
        end
        local now, cpu = mono_ns(), cpu_ns()
        local g = dict:get("gen") or 0
        if g ~= my_gen then
            my_gen, maxgap, maxcpu, last, lastcpu = g, 0, 0, now, cpu
            dict:set("max:" .. id, g .. " 0 0")
            return
        end
        local gap, busy = now - last, cpu - lastcpu
        last, lastcpu = now, cpu
        if gap > maxgap or busy > maxcpu then
            if gap > maxgap then
                maxgap = gap
            end
            if busy > maxcpu then
                maxcpu = busy
            end
            dict:set("max:" .. id, g .. " " .. maxgap .. " " .. maxcpu)
        end
    end
    local ok, err = ngx.timer.every(interval, tick)
    if not ok then
        ngx.log(ngx.ERR, "stall detector: ", err)
    end
end

function _M.reset()
    return dict:incr("gen", 1, 0)
end

-- longest gaps (ms) per worker in the current window, wall and CPU; a
-- worker that has not ticked since the reset is reported as -1
function _M.read()
    local g = dict:get("gen") or 0
    local wall, cpu = {}, {}
    for id = 0, ngx.worker.count() - 1 do
        local v = dict:get("max:" .. id)
        local vg, gap, busy = (v or ""):match("^(%d+) (%S+) (%S+)$")
        if vg and tonumber(vg) == g then
            wall[#wall + 1] = tonumber(gap) / 1e6
            cpu[#cpu + 1] = tonumber(busy) / 1e6
        else
            wall[#wall + 1] = -1
            cpu[#cpu + 1] = -1
        end
    end
    return { wall = wall, cpu = cpu }
end

return _M
