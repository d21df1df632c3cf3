-- The wrapper's API against the real library (no nginx): definitions,
-- updates, handles, del/reset, exposition. Returns a summary string.
local shmprom = require "resty.shmprom"

local m = shmprom.new{ zone = "lua-api", size = "4m" }
assert(shmprom.new{ zone = "lua-api" } == m, "same zone object per VM")

local reqs = m:counter("http_requests_total", "HTTP requests", {"host", "status"})
local lat = m:histogram("http_request_duration_seconds", "Request latency",
                        {"host"}, {0.005, 0.01, 0.05, 0.1, 0.5, 1, 5})
local inflight = m:gauge("http_requests_in_flight", "In flight", nil,
                         { mode = "livesum" })
local temp = m:gauge("temperature_celsius", "Temperature", {"room"})
local plain = m:counter("plain_total", "No labels")
local dflt = m:histogram("default_buckets_seconds", "Default buckets")

-- idempotent definition returns the same object
assert(m:counter("http_requests_total", "HTTP requests", {"host", "status"}) == reqs)

for i = 1, 1000 do
    assert(reqs:inc(1, {"example.org", 200}))
    assert(reqs:inc(2, {"example.org", "404"}))
    assert(lat:observe(i / 1000, {"example.org"}))
end
assert(reqs:value({"example.org", "200"}) == 1000)
assert(reqs:value({"example.org", 404}) == 2000, "number and string label values are one series")
assert(inflight:inc())
assert(inflight:inc(2))
assert(inflight:dec())
assert(inflight:value() == 2)
assert(temp:set(21.5, {"lab"}))
assert(temp:inc(1, {"lab"}))
assert(temp:dec(0.5, {"lab"}))
assert(temp:value({"lab"}) == 22)
assert(temp:set(-1/0, {"cold"}))
assert(plain:inc())
assert(dflt:observe(0.3))

-- label values as arguments after the value: the same series as a table's
local areqs = m:counter("arg_requests_total", "HTTP requests", {"host", "status"})
local alat = m:histogram("arg_duration_seconds", "Latency", {"host"},
                         {0.005, 0.01, 0.05, 0.1})
local aplain = m:counter("arg_plain_total", "No labels")
local five = m:counter("five_labels_total", "Five labels", {"a", "b", "c", "d", "e"})
local four = m:counter("four_labels_total", "Four labels", {"a", "b", "c", "d"})
local three = m:gauge("three_labels", "Three labels", {"a", "b", "c"})
for _ = 1, 100 do
    assert(areqs:inc(1, "args.org", 200))
    assert(areqs:inc(1, {"args.org", "200"}))
    assert(areqs:inc(nil, "args.org", "200"))
    assert(alat:observe(0.02, "args.org"))
    assert(four:inc(1, "w", "x", "y", "z"))
    assert(three:inc(2, "x", "y", 3))
    assert(three:dec(1, "x", "y", 3))
    assert(aplain:inc(1))
end
assert(areqs:value({"args.org", "200"}) == 300)
assert(alat:value({"args.org"}, 2) == 100, "0.02 in the third bucket")
assert(four:value({"w", "x", "y", "z"}) == 100)
assert(three:set(7, "x", "y", 3))
assert(three:value({"x", "y", "3"}) == 7)
assert(aplain:value() == 100)
-- too few, too many, wrong types, more than four as arguments: nil, err
local function fails(pat, ok, err)
    assert(ok == nil, "expected a failure like " .. pat)
    assert(err:find(pat), err)
end
fails("expected 2 label values, got 1", areqs:inc(1, "args.org"))
fails("expected 2 label values, got 0", areqs:inc(1))
fails("expected 2 label values, got more", areqs:inc(1, "args.org", 200, "x"))
fails("expected 4 label values, got more", four:inc(1, "w", "x", "y", "z", "v"))
fails("takes no label values", aplain:inc(1, "x"))
fails("label value for 'status' is a boolean", areqs:inc(1, "args.org", true))
fails("label value for 'host' is not a finite number", alat:observe(1, 0/0))
fails("pass more than 4 as a table", five:inc(1, "a", "b", "c", "d"))
fails("label values must be a table of 5 values, got nil", five:inc(1))
assert(five:inc(1, {"a", "b", "c", "d", "e"}))
assert(areqs:value({"args.org", "200"}) == 300, "failed calls count nothing")
-- the update methods are fields of the object (no metamethod per call)
assert(rawget(reqs, "inc") and rawget(lat, "observe") and rawget(temp, "set"))
assert(rawget(reqs, "observe") == nil and rawget(lat, "inc") == nil)

-- handles
local h = reqs:labels("example.org", "500")
for _ = 1, 10 do assert(h:inc()) end
assert(reqs:value({"example.org", "500"}) == 10)
local hl = lat:labels("other.org")
assert(hl:observe(0.007))
local hg = temp:labels("hall")
assert(hg:set(3))

local text = assert(m:metric_data())
local function has(line)
    if not text:find(line, 1, true) then
        error("missing line: " .. line .. "\n" .. text, 2)
    end
end
has('# HELP http_requests_total HTTP requests\n# TYPE http_requests_total counter\n')
has('http_requests_total{host="example.org",status="200"} 1000\n')
has('http_requests_total{host="example.org",status="404"} 2000\n')
has('http_requests_total{host="example.org",status="500"} 10\n')
has('http_request_duration_seconds_bucket{host="example.org",le="0.005"} 5\n')
has('http_request_duration_seconds_bucket{host="example.org",le="0.01"} 10\n')
has('http_request_duration_seconds_bucket{host="example.org",le="1"} 1000\n')
has('http_request_duration_seconds_bucket{host="example.org",le="+Inf"} 1000\n')
has('http_request_duration_seconds_count{host="example.org"} 1000\n')
has('http_request_duration_seconds_sum{host="example.org"} 500.5')
has('http_request_duration_seconds_bucket{host="other.org",le="0.005"} 0\n')
has('http_request_duration_seconds_bucket{host="other.org",le="0.01"} 1\n')
has('http_requests_in_flight 2\n')
has('temperature_celsius{room="lab"} 22\n')
has('temperature_celsius{room="cold"} -Inf\n')
has('temperature_celsius{room="hall"} 3\n')
has('plain_total 1\n')
has('default_buckets_seconds_bucket{le="0.25"} 0\n')
has('default_buckets_seconds_bucket{le="0.5"} 1\n')
has('default_buckets_seconds_bucket{le="10"} 1\n')
has('shmprom_series{family="http_requests_total"} 3\n')

-- families sorted by name
local last = ""
for name in text:gmatch("# TYPE ([%w_:]+)") do
    assert(name > last, "families out of order: " .. last .. " then " .. name)
    last = name
end

-- unlabelled metrics exported at 0 from definition
local fresh = m:counter("fresh_total", "Never touched")
local fresh_g = m:gauge("fresh_gauge", "Never touched")
local fresh_h = m:histogram("fresh_seconds", "Never touched", nil, {1})
text = assert(m:metric_data())
has('fresh_total 0\n')
has('fresh_gauge 0\n')
has('fresh_seconds_bucket{le="1"} 0\n')
has('fresh_seconds_bucket{le="+Inf"} 0\n')
has('fresh_seconds_count 0\n')
assert(fresh and fresh_g and fresh_h)

-- OpenMetrics
local om = assert(m:metric_data("openmetrics"))
assert(om:find('# TYPE http_requests counter\n', 1, true), om)
assert(om:find('http_requests_total{host="example.org",status="200"} 1000\n', 1, true))
assert(om:find('# TYPE plain counter\n', 1, true))
assert(om:find('\n# EOF\n$'), "ends with # EOF")

-- del and reset
assert(reqs:del({"example.org", "404"}))
text = assert(m:metric_data())
assert(not text:find('status="404"', 1, true), "deleted series left the output")
assert(reqs:inc(1, {"example.org", "404"}))
assert(reqs:value({"example.org", "404"}) == 1, "a deleted series comes back from 0")
assert(h:inc(), "a handle survives a delete of another series")
assert(reqs:value({"example.org", "500"}) == 11)
assert(reqs:reset())
text = assert(m:metric_data())
assert(not text:find('http_requests_total{', 1, true), "reset removed every series")
assert(h:inc(), "a handle resolves again after a reset")
assert(reqs:value({"example.org", "500"}) == 1)
assert(plain:reset())
text = assert(m:metric_data())
has('plain_total 0\n')

-- escaping
local esc = m:counter("escape_total", "Help with \\ and\nnewline", {"v"})
assert(esc:inc(1, {'a"b\\c\nd'}))
assert(esc:inc(1, {"bad\255utf8"}))
text = assert(m:metric_data())
has('# HELP escape_total Help with \\\\ and\\nnewline\n')
has('escape_total{v="a\\"b\\\\c\\nd"} 1\n')
has('escape_total{v="bad\239\191\189utf8"} 1\n')

-- bucket search: every bucket count from 1 to 40, values on, between,
-- below and above the bounds land where a linear scan puts them
for nb = 1, 40 do
    local bounds = {}
    for i = 1, nb do bounds[i] = i * 1.5 - 3 end
    local hb = m:histogram("search_" .. nb, "search", nil, bounds)
    local want = {}
    for i = 0, nb do want[i] = 0 end
    local vals = { -100, bounds[1], bounds[nb], bounds[nb] + 0.1, 1e300 }
    for i = 1, nb do
        vals[#vals + 1] = bounds[i]
        vals[#vals + 1] = bounds[i] - 0.25
        vals[#vals + 1] = bounds[i] + 0.25
    end
    for _, v in ipairs(vals) do
        assert(hb:observe(v))
        local k = nb
        for i = 1, nb do
            if v <= bounds[i] then k = i - 1 break end
        end
        want[k] = want[k] + 1
    end
    for k = 0, nb do
        local got = hb:value(nil, k)
        assert(got == want[k], ("%d buckets: bucket %d has %s, want %d")
               :format(nb, k, tostring(got), want[k]))
    end
end

-- miss path edges: label values kept on the stack (<= 8) or the heap (more),
-- keys encoded on the stack (<= 256 bytes) or the heap (longer, or not
-- UTF-8), and number values turned into strings under an eager GC (their
-- strings must stay anchored until the library has read them)
do
    local names = {}
    for i = 1, 10 do names[i] = "l" .. i end
    local wide = m:counter("wide_total", "ten labels", names)
    local vals = {}
    for i = 1, 10 do vals[i] = "v" .. i end
    assert(wide:inc(1, vals))
    assert(wide:inc(2, {"v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10"}))
    assert(wide:value(vals) == 3)
    local long = m:counter("long_total", "long values", {"a", "b"})
    local l255, l300 = string.rep("x", 250), string.rep("y", 300)
    for _, lv in ipairs({ {l255, "b"}, {l300, "b"}, {"a", l300}, {l255, "\255"} }) do
        assert(long:inc(1, lv))
        assert(long:inc(1, { lv[1], lv[2] }), "a fresh table finds the same series")
        assert(long:value({ lv[1], lv[2] }) == 2)
    end
    local text = assert(m:metric_data())
    assert(text:find('long_total{a="' .. l300 .. '",b="b"} 2\n', 1, true))
    assert(text:find('long_total{a="' .. l255 .. '",b="\239\191\189"} 2\n', 1, true))
    assert(text:find('wide_total{l1="v1",l2="v2",l3="v3",l4="v4",l5="v5",l6="v6",'
                     .. 'l7="v7",l8="v8",l9="v9",l10="v10"} 3\n', 1, true))

    local nums = m:counter("num_labels_total", "numbers", {"a", "b", "c"})
    local pause = collectgarbage("setpause", 0)
    local stepmul = collectgarbage("setstepmul", 1000000)
    for i = 1, 2000 do
        assert(nums:inc(1, {i, i + 0.5, -i}))
    end
    collectgarbage("setpause", pause)
    collectgarbage("setstepmul", stepmul)
    for i = 1, 2000, 97 do
        assert(nums:value({tostring(i), tostring(i + 0.5), tostring(-i)}) == 1)
    end
    text = assert(m:metric_data())
    assert(text:find('num_labels_total{a="1999",b="1999.5",c="-1999"} 1\n', 1, true))
end

-- prefault: the zone made resident at open (madvise on Linux >= 5.14),
-- mapped again by init_worker; it works like any other zone
do
    local pf = shmprom.new{ zone = "lua-prefault", size = "2m", prefault = true }
    assert(pf.prefault == "madvise" or pf.prefault == "touch", tostring(pf.prefault))
    assert(pf.prefault_part == "zone", tostring(pf.prefault_part))
    pf:init_worker()
    local pc = pf:counter("pf_total", "Prefaulted", {"k"})
    for i = 1, 100 do
        assert(pc:inc(1, {i % 10}))
    end
    assert(pc:value({3}) == 10)
    assert(pf:metric_data():find('pf_total{k="3"} 10\n', 1, true))
    assert(pf:check())
    -- by default the table only
    assert(m.prefault == "madvise" or m.prefault == "touch", tostring(m.prefault))
    assert(m.prefault_part == "table", tostring(m.prefault_part))
    local off = shmprom.new{ zone = "lua-prefault-off", size = "1m", prefault = false }
    assert(off.prefault == nil and off.prefault_part == nil, "no prefault when told not to")
    -- pages kept ahead of the frontiers: a 64th of the zone by default,
    -- none with prefault = false (unless asked) or true (all there)
    assert(m.ahead_bytes == 4 * 1048576 / 64, tostring(m.ahead_bytes))
    assert(off.ahead_bytes == 0 and pf.ahead_bytes == 0)
    assert(shmprom.new{ zone = "lua-ahead", size = "1m", prefault = false,
                        prefault_ahead = "64k" }.ahead_bytes == 65536)
end

assert(m:check())
return "ok"
