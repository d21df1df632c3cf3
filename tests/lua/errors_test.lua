-- Misuse raises at the caller's line; bad updates return nil, err, are
-- counted in shmprom_errors_total, and lose nothing else.
local shmprom = require "resty.shmprom"
local m = shmprom.new{ zone = "lua-errors", size = "1m" }

local THIS = debug.getinfo(1, "S").short_src

-- error(msg, 2) must point at the line of the call below
local function raises(pattern, f, ...)
    local line = debug.getinfo(2, "l").currentline
    local ok, err = pcall(f, ...)
    assert(not ok, "expected an error matching " .. pattern)
    assert(tostring(err):find(pattern), "error '" .. tostring(err)
           .. "' does not match " .. pattern)
    return err, line
end

local function at_caller(pattern, f)
    local ok, err = pcall(f)
    assert(not ok, "expected an error")
    assert(err:find(pattern), err)
    assert(err:find(THIS, 1, true), "error not at the caller's line: " .. err)
end

at_caller("invalid metric name", function() m:counter("1bad", "x") end)
at_caller("invalid metric name", function() m:counter("bad-name", "x") end)
at_caller("invalid label name", function() m:counter("c_total", "x", {"bad-label"}) end)
at_caller("invalid label name", function() m:counter("c_total", "x", {"__reserved"}) end)
at_caller("duplicate label name", function() m:counter("c_total", "x", {"a", "a"}) end)
at_caller("'le' is reserved", function() m:histogram("h", "x", {"le"}) end)
at_caller("strictly increasing", function() m:histogram("h", "x", nil, {1, 1}) end)
at_caller("not a number", function() m:histogram("h", "x", nil, {1, "2"}) end)
at_caller("not a finite", function() m:histogram("h", "x", nil, {0/0}) end)
at_caller("only gauges take a mode", function() m:counter("c_total", "x", nil, {mode = "livesum"}) end)
at_caller("unknown gauge mode", function() m:gauge("g", "x", nil, {mode = "max"}) end)
at_caller("shmprom_ prefix is reserved", function() m:counter("shmprom_x", "x") end)
at_caller("label names must be a table", function() m:counter("c_total", "x", "a") end)
at_caller("'zone' must be", function() shmprom.new{} end)
at_caller("'size' must be", function() shmprom.new{ zone = "x", size = "lots" } end)
at_caller("below the minimum", function() shmprom.new{ zone = "tiny", size = 1024 } end)
at_caller("'prefault' must be true, false or \"table\"", function() shmprom.new{ zone = "pf", prefault = "yes" } end)
at_caller("'prefault' must be true, false or \"table\"", function() shmprom.new{ zone = "pf", prefault = 1 } end)
for _, bad in ipairs({ "lots", -1, 1.5, true }) do
    at_caller("'prefault_ahead' must be false, a number of bytes or a string such as \"4m\"",
              function() shmprom.new{ zone = "pfa", prefault_ahead = bad } end)
end
at_caller("'cells_per_series' must be a number from 1 to 1024", function() shmprom.new{ zone = "cps", cells_per_series = 0.5 } end)
at_caller("'cells_per_series' must be a number from 1 to 1024", function() shmprom.new{ zone = "cps", cells_per_series = 0/0 } end)
at_caller("'cells_per_series' must be a number from 1 to 1024", function() shmprom.new{ zone = "cps", cells_per_series = "21" } end)

local c = m:counter("c_total", "x", {"a", "b"})
at_caller("already defined", function() m:counter("c_total", "x", {"a"}) end)
at_caller("already defined", function() m:gauge("c_total", "x", {"a", "b"}) end)

-- an accepted trailing +Inf bucket is the implicit one
local hinf = m:histogram("hinf", "x", nil, {1, math.huge})
assert(hinf:observe(3))

-- bad updates: nil, err; never raise
local bad_calls = {
    { c, "inc", -1, {"x", "y"} },
    { c, "inc", 0/0, {"x", "y"} },
    { c, "inc", math.huge, {"x", "y"} },
    { c, "inc", "1", {"x", "y"} },
}
for _, t in ipairs(bad_calls) do
    local ok, err = t[1][t[2]](t[1], t[3], t[4])
    assert(ok == nil and type(err) == "string", "bad value accepted: " .. tostring(t[3]))
end
local bad_labels = {
    {"x"}, {"x", "y", "z"}, {"x", nil}, {"x", true}, {"x", {}}, {"x", 0/0},
    "x", 42,
}
for i, lv in ipairs(bad_labels) do
    local ok, err = c:inc(1, lv)
    assert(ok == nil and type(err) == "string", "bad labels #" .. i .. " accepted")
end
local ok, err = c:inc(1, {"x", string.rep("v", 1024 * 1024)})
assert(ok == nil and err:find("too long"), tostring(err))
local h = m:histogram("h_seconds", "x", {"a"})
assert(h:observe(0/0, {"a"}) == nil)
assert(h:observe(1/0, {"a"}) == nil)
assert(h:observe(nil, {"a"}) == nil)
local g = m:gauge("g", "x")
assert(g:set("3") == nil)
assert(g:inc(0/0) == nil)

-- nothing else was lost: good updates between bad ones all count
for _ = 1, 100 do
    assert(c:inc(1, {"x", "y"}))
    assert(c:inc(-1, {"x", "y"}) == nil)
    assert(c:inc(1, {"x"}) == nil)
end
assert(c:value({"x", "y"}) == 100)

local text = assert(m:metric_data())
local function value(line)
    local v = text:match(line:gsub("[%[%]{}()\".]", "%%%0") .. " (%S+)\n")
    return tonumber(v)
end
assert(value('shmprom_errors_total{kind="bad_value"}') == 4 + 100 + 3 + 2,
       "bad values counted: " .. tostring(value('shmprom_errors_total{kind="bad_value"}')))
assert(value('shmprom_errors_total{kind="bad_labels"}') == #bad_labels + 100,
       "bad labels counted: " .. tostring(value('shmprom_errors_total{kind="bad_labels"}')))
assert(value('shmprom_errors_total{kind="key_too_long"}') == 1)

-- a full zone refuses new series, counts them, keeps the old ones exact
local full = shmprom.new{ zone = "lua-full", size = "256k" }
local f = full:counter("many_total", "x", {"i"})
local accepted, refused = 0, 0
for i = 1, 100000 do
    if f:inc(1, {i}) then accepted = accepted + 1 else refused = refused + 1 end
end
assert(refused > 0 and accepted > 0, "zone never filled")
for i = 1, accepted do
    assert(f:inc(1, {i}), "existing series still update")
end
local t2 = assert(full:metric_data())
assert(t2:find('shmprom_series_dropped_total{family="many_total"} ' .. refused .. '\n', 1, true),
       "dropped series counted")
assert(t2:find('many_total{i="1"} 2\n', 1, true))
assert(full:check())
return ("ok (%d accepted, %d refused in a 256k zone)"):format(accepted, refused)
