-- resty.shmprom: Prometheus metrics for every nginx worker in one
-- lock-free shared-memory zone (libshmprom.so, through LuaJIT FFI).
--
-- Definitions raise error(msg, 2) at the caller's line; updates never raise:
-- they return true, or nil and a message, and count the failure in
-- shmprom_errors_total{kind}.

local ffi = require "ffi"
local cdefs = require "resty.shmprom.cdefs"

local ffi_new = ffi.new
local ffi_string = ffi.string
local type = type
local tostring = tostring
local tonumber = tonumber
local error = error
local pcall = pcall
local setmetatable = setmetatable
local concat = table.concat
local str_format = string.format
local str_find = string.find
local floor = math.floor
local loadstring = loadstring
local HUGE = math.huge
local ngx = ngx

local _M = {
    _VERSION = "0.1.0",
    -- The C ABI this wrapper speaks: must equal shmprom_abi_version().
    ABI = 8,
}

local FFI_OK = 0
local KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM = 0, 1, 2
local MODE_SET, MODE_LIVESUM = 0, 1
local ERR_BAD_VALUE, ERR_BAD_LABELS, ERR_INTERNAL = 0, 1, 4
-- `how` of shmprom_zone_prefault (SHMPROM_PREFAULT_* in include/shmprom.h)
local PREFAULT_ALLOCATE, PREFAULT_MAP = 0, 1
local PREFAULT_ALLOCATE_TABLE, PREFAULT_MAP_TABLE = 2, 3
local PREFAULT_METHODS = { [0] = "madvise", [1] = "touch" }
-- Keeping pages mapped ahead of the key and cell frontiers (the option
-- prefault_ahead): its default, bytes past each frontier (at most; a 64th
-- of the zone for zones under 256 MiB), seconds between two checks, and
-- the most pages one check brings in (at init_worker / on a timer).
local AHEAD_BYTES = 4 * 1024 * 1024
local AHEAD_INTERVAL = 0.25
local AHEAD_FIRST_PAGES, AHEAD_TICK_PAGES = 4096, 256
-- Entries in a family's label cache before it is dropped and rebuilt.
local MAX_CACHE = 65536
-- Label values given as arguments (c:inc(1, a, b)): up to this many; a
-- family with more labels takes them as a table.
local MAX_ARGS = 4
-- Seconds between two error-log lines of the same kind, per worker.
local LOG_INTERVAL = 1

-- Longest a scrape waits for its render, in seconds.
local RENDER_TIMEOUT = 60

local CT_TEXT = "text/plain; version=0.0.4; charset=utf-8"
local CT_OPENMETRICS =
    "application/openmetrics-text; version=1.0.0; charset=utf-8"

_M.DEFAULT_BUCKETS = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

local ERRLEN = 512
local errbuf = ffi_new("char[?]", ERRLEN)

local C -- the loaded library
local lib_path

local function errmsg()
    return ffi_string(errbuf)
end

-- Finds libshmprom.so along package.cpath ("?" -> "libshmprom").
local function find_lib()
    for tpl in package.cpath:gmatch("[^;]+") do
        local p = tpl:gsub("%?", "libshmprom")
        local f = io.open(p, "rb")
        if f then
            f:close()
            return p
        end
    end
    return nil
end

local function load_lib(path, level)
    if C then
        return C
    end
    path = path or find_lib()
    if not path then
        error("resty.shmprom: libshmprom.so not found along package.cpath ("
              .. package.cpath .. "); add its directory, e.g. "
              .. "lua_package_cpath \"/path/to/shmprom/target/release/?.so;;\";",
              level + 1)
    end
    cdefs.define()
    local ok, lib = pcall(ffi.load, path)
    if not ok then
        error("resty.shmprom: cannot load " .. path .. ": " .. tostring(lib),
              level + 1)
    end
    local ok2, abi = pcall(function() return lib.shmprom_abi_version() end)
    if not ok2 then
        error("resty.shmprom: " .. path .. " is not a compatible libshmprom ("
              .. tostring(abi) .. ")", level + 1)
    end
    abi = tonumber(abi)
    if abi ~= _M.ABI then
        error(str_format("resty.shmprom: version mismatch: %s speaks ABI %d "
              .. "(library %s) but this wrapper (resty.shmprom %s) needs "
              .. "ABI %d; install the library and lua/ from the same "
              .. "release", path, abi, ffi_string(lib.shmprom_version()),
              _M._VERSION, _M.ABI), level + 1)
    end
    C = lib
    lib_path = path
    return C
end

local log_last = {}
local log_suppressed = {}

-- Logs at most one line per kind and LOG_INTERVAL per worker.
local function log_limited(kind, msg)
    local now = ngx and ngx.now() or os.time()
    local last = log_last[kind]
    if last and now - last < LOG_INTERVAL then
        log_suppressed[kind] = (log_suppressed[kind] or 0) + 1
        return
    end
    log_last[kind] = now
    local n = log_suppressed[kind]
    if n and n > 0 then
        msg = msg .. " (" .. n .. " similar messages suppressed)"
        log_suppressed[kind] = 0
    end
    if ngx then
        ngx.log(ngx.ERR, "shmprom: ", msg)
    else
        io.stderr:write("shmprom: ", msg, "\n")
    end
end

local function parse_size(s)
    if type(s) == "number" then
        return s
    end
    if type(s) ~= "string" then
        return nil
    end
    local n, unit = s:match("^%s*(%d+)%s*([kKmMgG]?)[bB]?%s*$")
    if not n then
        return nil
    end
    local mult = ({ [""] = 1, k = 1024, m = 1048576, g = 1073741824 })[
        unit:lower()]
    return tonumber(n) * mult
end

local function current_pid()
    if ngx then
        return ngx.worker.pid()
    end
    pcall(ffi.cdef, "int getpid(void);")
    return ffi.C.getpid()
end

local function in_master_init()
    return ngx and ngx.get_phase() == "init"
end

------------------------------------------------------------------------
-- Zones

local Zone = {}
Zone.__index = Zone

local zones = {} -- by name, one Lua object per VM

-- Drops every label cache of the zone: series were deleted or families
-- retired somewhere (epoch moved).
local function refresh(z)
    z.epoch = z.epoch_ptr[0]
    local list = z.list
    for i = 1, #list do
        local f = list[i]
        f.cache = {}
        f.ncache = 0
        f.idx0 = nil
    end
end

-- Claims this worker's plane (plain stores instead of atomic calls).
local function try_claim(z)
    if in_master_init() then
        return
    end
    local pid = current_pid()
    local now = ngx and ngx.now() or os.time()
    if z.claim_pid == pid and now - z.claim_at < 1 then
        return
    end
    z.claim_pid = pid
    z.claim_at = now
    local p = tonumber(C.shmprom_plane_claim(z.ptr, pid))
    if p and p > 0 then
        z.plane = p
        z.off = p * z.stride
        -- the library moved the spare's shares to the plane and gave the
        -- spare back
        z.spare = 0
        -- Move what this worker put on the shared plane for livesum gauges
        -- to its own plane, so it drops out with this worker.
        local cells, off = z.cells, z.off
        for idx, net in pairs(z.live_shared) do
            C.shmprom_cell_add(z.ptr, 0, idx, -net)
            cells[off + idx] = cells[off + idx] + net
        end
        z.live_shared = {}
    elseif z.spare == 0 then
        -- no plane (the old workers of a reload hold them): a spare owner
        -- record keeps this worker's livesum shares apart until it has one
        local sp = tonumber(C.shmprom_spare_claim(z.ptr, pid))
        if sp and sp > 0 then
            z.spare = sp
        end
    end
end

-- (internal; resty.shmprom.gateway uses it too) The function `name` of
-- ngx_http_shmprom_module (declared as `decl`, after the library's
-- cdefs), or nil when nginx did not load the module. Looked up in nginx's
-- own namespace (it loads modules RTLD_GLOBAL), not the library's.
local module_declared = {}
function _M._module_function(name, decl)
    if not module_declared[name] then
        -- pcall: declared already when this file is loaded again in the VM
        pcall(ffi.cdef, decl)
        module_declared[name] = true
    end
    local ok, fn = pcall(function()
        return ffi.C[name]
    end)
    return ok and fn or nil
end

-- Hands the zone's directive recorder to ngx_http_shmprom_module when
-- nginx loaded it (its shmprom_inc / shmprom_observe directives find their
-- metrics in the zones attached while nginx reads the configuration: in
-- init_by_lua*, in the master).
local function attach_module(z)
    local attach = _M._module_function("ngx_http_shmprom_attach",
        "int ngx_http_shmprom_attach(const shmprom_rec_hooks *hooks);")
    if not attach then
        return -- the module is not loaded
    end
    local rec = C.shmprom_rec_open(z.ptr, errbuf, ERRLEN)
    if rec == nil then
        ngx.log(ngx.ERR, "shmprom: zone '", z.name, "': ", errmsg())
        return
    end
    local hooks = ffi_new("shmprom_rec_hooks")
    if C.shmprom_rec_get_hooks(rec, hooks) ~= FFI_OK then
        ngx.log(ngx.ERR, "shmprom: zone '", z.name, "': no recorder hooks")
        return
    end
    -- the module copies the name before attach returns
    hooks.zone = z.name
    hooks.zone_len = #z.name
    if attach(hooks) < 0 then
        ngx.log(ngx.WARN, "shmprom: zone '", z.name, "': ",
                "ngx_http_shmprom_module does not take its hooks (built ",
                "for another libshmprom ABI): its directives cannot use it")
    end
end

--- shmprom.new{ zone = "name", size = "32m", planes = n, path = nil,
---              lib = nil, prefault = "table", prefault_ahead = nil,
---              cells_per_series = nil }
-- Opens (creating it on first use) a shared zone. Call it from
-- init_by_lua* so every worker inherits it.
function _M.new(opts)
    if type(opts) ~= "table" then
        error("shmprom.new: expected a table of options", 2)
    end
    local name = opts.zone
    if type(name) ~= "string" or name == "" then
        error("shmprom.new: 'zone' must be a non-empty string", 2)
    end
    local size = parse_size(opts.size or "32m")
    if not size then
        error("shmprom.new: 'size' must be a number of bytes or a string "
              .. "such as \"32m\", got " .. tostring(opts.size), 2)
    end
    -- One plane per worker (8 bytes per plane per series). During a
    -- reload the new workers find the planes held by the old ones: until
    -- those exit they write counters and histograms on the shared plane
    -- (atomically) and their livesum gauge shares through a spare owner
    -- record (one per plane, a cell per livesum series), so that the
    -- share of a worker killed in that window still drops out.
    local workers = ngx and ngx.worker.count() or 1
    local planes = opts.planes or workers
    if type(planes) ~= "number" or planes < 0 or planes ~= floor(planes) then
        error("shmprom.new: 'planes' must be a whole number", 2)
    end
    if opts.path ~= nil and type(opts.path) ~= "string" then
        error("shmprom.new: 'path' must be a string", 2)
    end
    -- the average cells of the zone's series (1 a counter or gauge,
    -- buckets + 2 a histogram's label set): how the zone is shared among
    -- table, key blocks and cells; nil: the library's default (1.25)
    local cps = opts.cells_per_series
    if cps ~= nil and (type(cps) ~= "number" or not (cps >= 1 and cps <= 1024))
    then
        error("shmprom.new: 'cells_per_series' must be a number from 1 to "
              .. "1024", 2)
    end
    -- true: the whole zone; "table" (the default): the series table's
    -- slots, where new series land at random; false: nothing
    local prefault = opts.prefault
    local prefault_default = prefault == nil
    if prefault_default then
        prefault = "table"
    elseif prefault ~= true and prefault ~= false and prefault ~= "table" then
        error("shmprom.new: 'prefault' must be true, false or \"table\"", 2)
    end
    -- bytes kept mapped past the key and cell frontiers, in each worker,
    -- from a timer (0: none); by default a 64th of the zone, at most 4m,
    -- unless prefault is false. A whole-zone prefault has them already.
    local ahead = opts.prefault_ahead
    if ahead == nil then
        ahead = prefault == "table" and math.min(AHEAD_BYTES, floor(size / 64))
                or 0
    elseif ahead == false then
        ahead = 0
    else
        ahead = parse_size(ahead)
        if not ahead or ahead < 0 or ahead ~= floor(ahead) then
            error("shmprom.new: 'prefault_ahead' must be false, a number of "
                  .. "bytes or a string such as \"4m\", got "
                  .. tostring(opts.prefault_ahead), 2)
        end
    end
    if prefault == true then
        ahead = 0
    end
    local ttl = opts.ttl
    if ttl ~= nil and (type(ttl) ~= "number" or ttl < 1 or ttl ~= floor(ttl))
    then
        error("shmprom.new: 'ttl' must be a whole number of seconds >= 1", 2)
    end
    local grace = opts.reuse_grace
    if grace ~= nil and (type(grace) ~= "number" or grace < 1
                         or grace ~= floor(grace)) then
        error("shmprom.new: 'reuse_grace' must be a whole number of seconds "
              .. ">= 1", 2)
    end
    local render_cache = opts.render_cache or 0
    if type(render_cache) ~= "number" or render_cache < 0 then
        error("shmprom.new: 'render_cache' must be a number of seconds >= 0",
              2)
    end
    local gzip = opts.gzip
    if gzip ~= nil and type(gzip) ~= "boolean" then
        error("shmprom.new: 'gzip' must be a boolean", 2)
    end
    local render_nice = opts.render_nice
    if render_nice ~= nil and (type(render_nice) ~= "number"
                               or render_nice < 0 or render_nice > 19
                               or render_nice ~= floor(render_nice)) then
        error("shmprom.new: 'render_nice' must be a whole number 0-19", 2)
    end
    load_lib(opts.lib, 2)
    local existing = zones[name]
    if existing then
        return existing
    end
    local out = ffi_new("shmprom_zone*[1]")
    local rc = C.shmprom_zone_open(name, #name, size, planes + 1, cps or 0,
                                   opts.path, out, errbuf, ERRLEN)
    if rc < 0 then
        error("shmprom.new: zone '" .. name .. "': " .. errmsg(), 2)
    end
    if rc == 1 and ngx then
        ngx.log(ngx.WARN, "shmprom: zone '", name, "': ", errmsg())
    end
    -- The zone (or its table) resident now, in the master before the
    -- workers fork (each worker then maps it in init_worker). Safe on a
    -- zone already in use (a reload): no value changes.
    local prefaulted, prefault_part
    if prefault then
        local how = prefault == true and PREFAULT_ALLOCATE
                    or PREFAULT_ALLOCATE_TABLE
        local prc = C.shmprom_zone_prefault(out[0], how, errbuf, ERRLEN)
        if prc >= 0 then
            prefaulted = PREFAULT_METHODS[tonumber(prc)]
            prefault_part = prefault == true and "zone" or "table"
        elseif prefault_default then
            -- not asked for: the zone works without, page by page
            if ngx then
                ngx.log(ngx.WARN, "shmprom: zone '", name, "': prefault of ",
                        "the table: ", errmsg())
            end
        else
            error("shmprom.new: zone '" .. name .. "': prefault: " .. errmsg(),
                  2)
        end
    end
    if grace then
        C.shmprom_zone_set_grace(out[0], grace)
    end
    if render_nice then
        C.shmprom_render_set_nice(out[0], render_nice)
    end
    local info = ffi_new("shmprom_zone_info")
    if C.shmprom_zone_get_info(out[0], info) ~= FFI_OK then
        error("shmprom.new: zone '" .. name .. "': no zone info", 2)
    end
    local z = setmetatable({
        name = name,
        ptr = out[0],
        cells = info.cells,
        stride = tonumber(info.plane_stride),
        epoch_ptr = info.epoch,
        epoch = info.epoch[0],
        planes = info.planes,
        plane = 0,
        off = 0,
        spare = 0,
        claim_pid = nil,
        claim_at = 0,
        list = {},
        by_name = {},
        live_shared = {},
        render_cache = render_cache,
        ttl = ttl,
        render_thread = opts.render_thread ~= false,
        gzip = gzip ~= false,
        lib = lib_path,
        -- "madvise" or "touch" (how the zone was made resident), or nil
        prefault = prefaulted,
        -- "zone" or "table" (what was made resident), or nil
        prefault_part = prefault_part,
        -- bytes kept mapped past the frontiers (0: none)
        ahead_bytes = ahead,
        -- this worker's 2 marks for shmprom_zone_populate_ahead, or nil
        ahead = nil,
    }, Zone)
    zones[name] = z
    if in_master_init() then
        attach_module(z)
    end
    return z
end

--- m:init_worker()
-- Claims this worker's plane now (from init_worker_by_lua*). Optional: the
-- first update claims it otherwise. Retries every second while all planes
-- are taken (old workers of a reload still running).
function Zone:init_worker()
    -- A worker inherits the zone's pages but not their page table entries:
    -- map them all now rather than one fault per page at first use.
    if self.prefault and not self.mapped and not in_master_init() then
        self.mapped = true
        local how = self.prefault_part == "zone" and PREFAULT_MAP
                    or PREFAULT_MAP_TABLE
        local rc = C.shmprom_zone_prefault(self.ptr, how, errbuf, ERRLEN)
        if rc < 0 then
            log_limited("prefault", "zone '" .. self.name .. "': prefault in "
                        .. "the worker: " .. errmsg())
        end
    end
    try_claim(self)
    -- Keep the pages just past the cell frontier of this worker's plane
    -- and the key arena's mapped, from a timer (prefault_ahead): new
    -- series then do not take a page fault each (a few microseconds) in
    -- the request that creates them.
    if self.ahead_bytes > 0 and ngx and not self.ahead
       and not in_master_init() then
        self.ahead = ffi_new("uint64_t[2]")
        local z = self
        local function ahead(max_pages)
            local n = C.shmprom_zone_populate_ahead(z.ptr, z.plane,
                                                    z.ahead_bytes, max_pages,
                                                    z.ahead, errbuf, ERRLEN)
            if n < 0 then
                log_limited("ahead", "zone '" .. z.name .. "': keeping "
                            .. "pages ahead of use: " .. errmsg())
            end
        end
        ahead(AHEAD_FIRST_PAGES)
        local ok, err = ngx.timer.every(AHEAD_INTERVAL, function(premature)
            if not premature then
                ahead(AHEAD_TICK_PAGES)
            end
        end)
        if not ok then
            ngx.log(ngx.WARN, "shmprom: cannot start the timer that keeps "
                    .. "pages ahead of use: ", err)
        end
    end
    if self.plane == 0 and ngx and not self.retrying then
        self.retrying = true
        local z = self
        local ok, err = ngx.timer.every(1, function(premature)
            if premature or z.plane > 0 then
                return
            end
            z.claim_at = 0
            try_claim(z)
        end)
        if not ok then
            ngx.log(ngx.WARN, "shmprom: cannot start plane retry timer: ",
                    err)
        end
    end
    if self.ttl and ngx and ngx.worker.id() == 0 and not self.sweeping then
        self.sweeping = true
        local z = self
        local every = self.ttl / 4
        if every < 1 then
            every = 1
        end
        local ok, err = ngx.timer.every(every, function(premature)
            if not premature then
                z:sweep()
            end
        end)
        if not ok then
            ngx.log(ngx.ERR, "shmprom: cannot start the ttl sweep timer: ",
                    err)
        end
    end
    return self.plane
end

--- m:sweep() -> number of series removed
-- Removes the series whose value has not changed for the zone's ttl
-- seconds. init_worker runs it on a timer in worker 0 when ttl is set.
function Zone:sweep()
    if not self.ttl then
        return 0
    end
    local n = tonumber(C.shmprom_sweep(self.ptr, self.ttl))
    if n > 0 then
        refresh(self)
    end
    return n
end

------------------------------------------------------------------------
-- Families

local Family = {}
Family.__index = Family

local Counter = setmetatable({}, Family)
Counter.__index = Counter
local Gauge = setmetatable({}, Family)
Gauge.__index = Gauge
local Histogram = setmetatable({}, Family)
Histogram.__index = Histogram

local HOT_METHODS = { "inc", "dec", "set", "observe" }

local KIND_NAMES = { [KIND_COUNTER] = "counter", [KIND_GAUGE] = "gauge",
                     [KIND_HISTOGRAM] = "histogram" }
local CLASSES = { [KIND_COUNTER] = Counter, [KIND_GAUGE] = Gauge,
                  [KIND_HISTOGRAM] = Histogram }

-- Bucket search: a fixed number of bisection steps over the bounds padded
-- with +Inf to a power of two, unrolled (no loop, so LuaJIT keeps it in the
-- caller's trace). Returns the 0-based bucket: the first bound >= v, or nb
-- for +Inf. One function per step count, made once.
local searches = {}

local function bucket_search(steps)
    local fn = searches[steps]
    if fn then
        return fn
    end
    local src = { "local B, v = ...\nlocal k = 0\n" }
    local m = 2 ^ (steps - 1)
    while m >= 1 do
        src[#src + 1] = ("if v > B[k + %d] then k = k + %d end\n")
                        :format(m - 1, m)
        m = m / 2
    end
    src[#src + 1] = "return k\n"
    fn = assert(loadstring(concat(src), "=shmprom.bucket_search"))
    searches[steps] = fn
    return fn
end

local function define(z, kind, name, help, labels, buckets, opts, level)
    level = level + 1
    if type(name) ~= "string" then
        error("metric name must be a string", level)
    end
    if help == nil then
        help = ""
    elseif type(help) ~= "string" then
        error("metric '" .. name .. "': help must be a string", level)
    end
    if labels == nil then
        labels = {}
    elseif type(labels) ~= "table" then
        error("metric '" .. name .. "': label names must be a table of "
              .. "strings", level)
    end
    local nl = #labels
    for k in pairs(labels) do
        if type(k) ~= "number" or k < 1 or k > nl or k ~= floor(k) then
            error("metric '" .. name .. "': label names must be a list",
                  level)
        end
    end
    for i = 1, nl do
        if type(labels[i]) ~= "string" then
            error("metric '" .. name .. "': label name #" .. i
                  .. " is not a string", level)
        end
    end
    local mode = MODE_SET
    if opts ~= nil then
        if type(opts) ~= "table" then
            error("metric '" .. name .. "': options must be a table", level)
        end
        if opts.mode ~= nil then
            if kind ~= KIND_GAUGE then
                error("metric '" .. name .. "': only gauges take a mode",
                      level)
            end
            if opts.mode == "livesum" then
                mode = MODE_LIVESUM
            elseif opts.mode ~= "set" then
                error("metric '" .. name .. "': unknown gauge mode '"
                      .. tostring(opts.mode) .. "' (set or livesum)", level)
            end
        end
    end
    local bl = {}
    if kind == KIND_HISTOGRAM then
        if buckets == nil then
            buckets = _M.DEFAULT_BUCKETS
        elseif type(buckets) ~= "table" then
            error("metric '" .. name .. "': buckets must be a table of "
                  .. "numbers", level)
        end
        for i = 1, #buckets do
            local b = buckets[i]
            if type(b) ~= "number" then
                error("metric '" .. name .. "': bucket #" .. i
                      .. " is not a number", level)
            end
            if not (i == #buckets and b == HUGE) then
                bl[#bl + 1] = b
            end
        end
    end

    local shape = KIND_NAMES[kind] .. "|" .. mode .. "|" .. concat(labels, ",")
                  .. "|" .. concat(bl, ",")
    local old = z.by_name[name]
    if old then
        if old.shape == shape then
            if old.help ~= help then
                error("metric '" .. name .. "' is already defined with "
                      .. "another help text", level)
            end
            return old
        end
        error("metric '" .. name .. "' is already defined as "
              .. old.shape .. "; cannot redefine it as " .. shape, level)
    end

    local ln = ffi_new("const char*[?]", nl + 1)
    local ll = ffi_new("size_t[?]", nl + 1)
    for i = 1, nl do
        ln[i - 1] = labels[i]
        ll[i - 1] = #labels[i]
    end
    local bb = ffi_new("double[?]", #bl + 1)
    for i = 1, #bl do
        bb[i - 1] = bl[i]
    end
    local id = C.shmprom_family_define(z.ptr, name, #name, help, #help, kind,
                                       mode, nl, ln, ll, #bl, bb, errbuf,
                                       ERRLEN)
    if id < 0 then
        error("metric '" .. name .. "': " .. errmsg(), level)
    end
    local f = setmetatable({
        zone = z,
        id = tonumber(id),
        name = name,
        help = help,
        kind = kind,
        mode = mode,
        shape = shape,
        label_names = labels,
        nlabels = nl,
        buckets = bl,
        nb = #bl,
        bounds = false,
        search = false,
        cache = {},
        ncache = 0,
        idx0 = nil,
        -- scratch for the miss path
        vals = ffi_new("const char*[?]", nl + 1),
        lens = ffi_new("size_t[?]", nl + 1),
        anchor = {},
    }, CLASSES[kind])
    -- The update methods as fields of the object itself: log_by_lua* chunks
    -- run in LuaJIT's interpreter (a chunk is a vararg function, which
    -- starts no trace), where `f:inc` found through the metatable costs a
    -- metamethod lookup on every call.
    for i = 1, #HOT_METHODS do
        local m = HOT_METHODS[i]
        f[m] = rawget(CLASSES[kind], m)
    end
    if kind == KIND_HISTOGRAM then
        local steps = 1
        while 2 ^ steps < #bl + 1 do
            steps = steps + 1
        end
        local b = ffi_new("double[?]", 2 ^ steps)
        for i = 0, 2 ^ steps - 1 do
            b[i] = bl[i + 1] or HUGE
        end
        f.bounds = b
        f.search = bucket_search(steps)
    end
    z.by_name[name] = f
    z.list[#z.list + 1] = f
    return f
end

--- m:counter(name, help, label_names)
function Zone:counter(name, help, labels, opts)
    -- not a tail call: error levels count this frame
    local f = define(self, KIND_COUNTER, name, help, labels, nil, opts, 2)
    return f
end

--- m:gauge(name, help, label_names, { mode = "set" | "livesum" })
function Zone:gauge(name, help, labels, opts)
    -- not a tail call: error levels count this frame
    local f = define(self, KIND_GAUGE, name, help, labels, nil, opts, 2)
    return f
end

--- m:histogram(name, help, label_names, buckets)
function Zone:histogram(name, help, labels, buckets, opts)
    -- not a tail call: error levels count this frame
    local f = define(self, KIND_HISTOGRAM, name, help, labels, buckets, opts, 2)
    return f
end

local function bad(f, kind, msg)
    C.shmprom_error_count(f.zone.ptr, kind)
    msg = f.name .. ": " .. msg
    log_limited(kind, msg)
    return nil, msg
end

local function label_string(v)
    if v == floor(v) and v > -9007199254740992 and v < 9007199254740992 then
        return str_format("%d", v)
    end
    return str_format("%.17g", v)
end

-- The miss path: validates label values, asks the library for the series
-- (creating it) and caches the answer.
local function miss(f, lv)
    local z = f.zone
    if z.plane == 0 then
        try_claim(z)
    end
    local n = f.nlabels
    if n == 0 then
        if lv ~= nil and (type(lv) ~= "table" or lv[1] ~= nil) then
            return bad(f, ERR_BAD_LABELS, "takes no label values")
        end
    else
        if type(lv) ~= "table" then
            return bad(f, ERR_BAD_LABELS, "label values must be a table of "
                       .. n .. " values, got " .. type(lv))
        end
        if lv[n + 1] ~= nil then
            return bad(f, ERR_BAD_LABELS, "expected " .. n
                       .. " label values, got more")
        end
    end
    local vals, lens, anchor = f.vals, f.lens, f.anchor
    local anchored = false
    for i = 1, n do
        local v = lv[i]
        local tv = type(v)
        local s
        if tv == "string" then
            -- lv keeps it alive through the call
            s = v
        elseif tv == "number" then
            if v ~= v or v == HUGE or v == -HUGE then
                return bad(f, ERR_BAD_LABELS, "label value for '"
                           .. f.label_names[i] .. "' is not a finite number")
            end
            -- a new string only vals[] points at: anchor it until the call
            -- returns (a later label_string may run the GC)
            s = label_string(v)
            anchor[i] = s
            anchored = true
        elseif tv == "nil" then
            return bad(f, ERR_BAD_LABELS, "expected " .. n
                       .. " label values, got " .. (i - 1))
        else
            return bad(f, ERR_BAD_LABELS, "label value for '"
                       .. f.label_names[i] .. "' is a " .. tv
                       .. ", expected a string or number")
        end
        vals[i - 1] = s
        lens[i - 1] = #s
    end
    local r = C.shmprom_series_get(z.ptr, f.id, n, vals, lens, errbuf,
                                   ERRLEN)
    if anchored then
        for i = 1, n do
            anchor[i] = nil
        end
    end
    if r < 0 then
        local msg = f.name .. ": " .. errmsg()
        log_limited("series" .. tonumber(r), msg)
        return nil, msg
    end
    local idx = tonumber(r)
    if n == 0 then
        f.idx0 = idx
        return idx
    end
    if f.ncache >= MAX_CACHE then
        f.cache = {}
        f.ncache = 0
    end
    local t = f.cache
    for i = 1, n - 1 do
        local k = lv[i]
        local nt = t[k]
        if nt == nil then
            nt = {}
            t[k] = nt
        end
        t = nt
    end
    t[lv[n]] = idx
    f.ncache = f.ncache + 1
    return idx
end

-- The series index of (f, label values): the per-worker cache, else miss.
local function series(f, lv)
    local z = f.zone
    if z.epoch_ptr[0] ~= z.epoch then
        refresh(z)
    end
    local n = f.nlabels
    if n == 0 then
        local i = f.idx0
        if i and (lv == nil or (type(lv) == "table" and lv[1] == nil)) then
            return i
        end
        return miss(f, lv)
    end
    if type(lv) ~= "table" then
        return miss(f, lv)
    end
    local t = f.cache
    for i = 1, n - 1 do
        t = t[lv[i]]
        if t == nil then
            return miss(f, lv)
        end
    end
    local idx = t[lv[n]]
    if idx == nil or lv[n + 1] ~= nil then
        return miss(f, lv)
    end
    return idx
end

-- The series index of (f, label values given as arguments a..d): the
-- per-worker cache, else the miss path with the values packed in a table.
-- e is one past the most values a family takes this way (MAX_ARGS): a
-- value there means too many. No table is built on a hit.
local function series_args(f, a, b, c, d, e)
    local z = f.zone
    if z.epoch_ptr[0] ~= z.epoch then
        refresh(z)
    end
    local n = f.nlabels
    local idx
    if n == 0 then
        idx = f.idx0
        if idx and a == nil then
            return idx
        end
        return miss(f, a ~= nil and { a } or nil)
    elseif n > MAX_ARGS then
        if a == nil then
            return miss(f, nil)
        end
        return bad(f, ERR_BAD_LABELS, "takes " .. n .. " label values: pass "
                   .. "more than " .. MAX_ARGS .. " as a table")
    end
    local t = f.cache
    if n == 1 then
        idx = t[a]
        if idx ~= nil and b == nil then
            return idx
        end
    elseif n == 2 then
        t = t[a]
        idx = t and t[b]
        if idx ~= nil and c == nil then
            return idx
        end
    elseif n == 3 then
        t = t[a]
        t = t and t[b]
        idx = t and t[c]
        if idx ~= nil and d == nil then
            return idx
        end
    else
        t = t[a]
        t = t and t[b]
        t = t and t[c]
        idx = t and t[d]
        if idx ~= nil and e == nil then
            return idx
        end
    end
    return miss(f, { a, b, c, d, e })
end

-- The series index of label values given as one table or as arguments.
local function series_of(f, a, b, c, d, e)
    if type(a) == "table" then
        return series(f, a)
    end
    return series_args(f, a, b, c, d, e)
end

-- Adds v to cell idx of this worker's plane (plain store) or, without a
-- plane, to the shared plane (atomic).
local function add(z, idx, v)
    local off = z.off
    if off > 0 then
        local c = z.cells
        local p = off + idx
        c[p] = c[p] + v
    else
        C.shmprom_cell_add(z.ptr, 0, idx, v)
    end
end

local function observe(f, idx, v)
    local nb = f.nb
    local k = f.search(f.bounds, v)
    local z = f.zone
    local off = z.off
    if off > 0 then
        local c = z.cells
        local p = off + idx
        c[p + k] = c[p + k] + 1
        local s = p + nb + 1
        c[s] = c[s] + v
    else
        local zp = z.ptr
        C.shmprom_cell_add(zp, 0, idx + k, 1)
        C.shmprom_cell_add(zp, 0, idx + nb + 1, v)
    end
end

-- A livesum gauge written by a worker without a plane of its own (`set`:
-- v is the worker's whole share, else an increment). With a spare owner
-- record its share goes to the spare's cell of the series on the shared
-- plane, which drops out with this worker as a plane's does; without one,
-- its net share on the series' shared cell is remembered, to move to its
-- plane later.
local function live_shared_add(z, idx, v, set)
    if z.spare > 0
       and C.shmprom_spare_held(z.ptr, z.spare, current_pid()) ~= 1 then
        -- another caller in this worker (the gateway module's recorder)
        -- claimed the plane since, which gave the spare back
        z.spare = 0
        z.claim_at = 0
        try_claim(z)
    end
    local off = z.off
    if off > 0 then
        local c = z.cells
        c[off + idx] = set and v or c[off + idx] + v
        return
    end
    local sh = z.live_shared
    local sp = z.spare
    if sp > 0 then
        if set then
            C.shmprom_cell_set(z.ptr, 0, idx + sp, v - (sh[idx] or 0))
        else
            C.shmprom_cell_add(z.ptr, 0, idx + sp, v)
        end
        return
    end
    if set then
        v = v - (sh[idx] or 0)
    end
    sh[idx] = (sh[idx] or 0) + v
    C.shmprom_cell_add(z.ptr, 0, idx, v)
end

local function gauge_set(f, idx, v)
    local z = f.zone
    if f.mode ~= MODE_LIVESUM then
        C.shmprom_cell_set(z.ptr, 0, idx, v)
    elseif z.off > 0 then
        z.cells[z.off + idx] = v
    else
        live_shared_add(z, idx, v, true)
    end
end

local function gauge_add(f, idx, v)
    local z = f.zone
    if f.mode ~= MODE_LIVESUM then
        C.shmprom_cell_add(z.ptr, 0, idx, v)
    elseif z.off > 0 then
        local c = z.cells
        local p = z.off + idx
        c[p] = c[p] + v
    else
        live_shared_add(z, idx, v)
    end
end

local function check_inc(v)
    return type(v) == "number" and v >= 0 and v < HUGE
end

local function check_finite(v)
    return type(v) == "number" and v > -HUGE and v < HUGE
end

--- counter:inc(value?, label_values?) -> true | nil, err
--- counter:inc(value?, v1, v2, ...) -> true | nil, err
function Counter:inc(v, a, b, c, d, e)
    if v == nil then
        v = 1
    elseif not check_inc(v) then
        return bad(self, ERR_BAD_VALUE, "counter increment must be a "
                   .. "finite number >= 0, got " .. tostring(v))
    end
    local idx, err = series_of(self, a, b, c, d, e)
    if not idx then
        return nil, err
    end
    add(self.zone, idx, v)
    return true
end

--- gauge:set(value, label_values?) -> true | nil, err
--- gauge:set(value, v1, v2, ...) -> true | nil, err
function Gauge:set(v, a, b, c, d, e)
    if type(v) ~= "number" then
        return bad(self, ERR_BAD_VALUE, "gauge value must be a number, got "
                   .. type(v))
    end
    local idx, err = series_of(self, a, b, c, d, e)
    if not idx then
        return nil, err
    end
    gauge_set(self, idx, v)
    return true
end

-- gauge:inc and gauge:dec: sign 1 or -1.
local function gauge_step(self, sign, what, v, a, b, c, d, e)
    if v == nil then
        v = 1
    elseif not check_finite(v) then
        return bad(self, ERR_BAD_VALUE, "gauge " .. what .. " must be a "
                   .. "finite number, got " .. tostring(v))
    end
    local idx, err = series_of(self, a, b, c, d, e)
    if not idx then
        return nil, err
    end
    gauge_add(self, idx, sign * v)
    return true
end

--- gauge:inc(value?, label_values?) -> true | nil, err
--- gauge:inc(value?, v1, v2, ...) -> true | nil, err
function Gauge:inc(v, a, b, c, d, e)
    return gauge_step(self, 1, "increment", v, a, b, c, d, e)
end

--- gauge:dec(value?, label_values?) -> true | nil, err
--- gauge:dec(value?, v1, v2, ...) -> true | nil, err
function Gauge:dec(v, a, b, c, d, e)
    return gauge_step(self, -1, "decrement", v, a, b, c, d, e)
end

--- histogram:observe(value, label_values?) -> true | nil, err
--- histogram:observe(value, v1, v2, ...) -> true | nil, err
function Histogram:observe(v, a, b, c, d, e)
    if not check_finite(v) then
        return bad(self, ERR_BAD_VALUE, "observation must be a finite "
                   .. "number, got " .. tostring(v))
    end
    local idx, err = series_of(self, a, b, c, d, e)
    if not idx then
        return nil, err
    end
    observe(self, idx, v)
    return true
end

local function values_args(f, lv)
    local n = f.nlabels
    if lv == nil then
        lv = {}
    end
    if type(lv) ~= "table" then
        return nil, "label values must be a table"
    end
    if lv[n + 1] ~= nil then
        return nil, "expected " .. n .. " label values, got more"
    end
    local keep = {}
    for i = 1, n do
        local v = lv[i]
        if type(v) == "number" then
            v = label_string(v)
        elseif type(v) ~= "string" then
            return nil, "expected " .. n .. " string or number label values"
        end
        keep[i] = v
        f.vals[i - 1] = v
        f.lens[i - 1] = #v
    end
    return keep
end

--- family:del(label_values?) -> true | nil, err
-- Deletes one series; it leaves the output. True also when it did not exist.
function Family:del(lv)
    local keep, err = values_args(self, lv)
    if not keep then
        return bad(self, ERR_BAD_LABELS, err)
    end
    local rc = C.shmprom_series_del(self.zone.ptr, self.id, self.nlabels,
                                    self.vals, self.lens, errbuf, ERRLEN)
    keep = nil -- luacheck: ignore
    if rc < 0 then
        return nil, self.name .. ": " .. errmsg()
    end
    refresh(self.zone)
    return true
end

--- family:reset() -> true | nil, err
-- Deletes every series of the family (an unlabelled one restarts at 0).
function Family:reset()
    local rc = C.shmprom_family_reset(self.zone.ptr, self.id, errbuf, ERRLEN)
    if rc < 0 then
        return nil, self.name .. ": " .. errmsg()
    end
    refresh(self.zone)
    return true
end

--- family:value(label_values?, k?) -> number | nil, err
-- The current value (summed over workers) of a counter or gauge, or of cell
-- k of a histogram series (0-based: buckets, +Inf, then sum). For tests and
-- status pages, not for the hot path.
function Family:value(lv, k)
    local idx, err = series(self, lv)
    if not idx then
        return nil, err
    end
    return tonumber(C.shmprom_cell_get(self.zone.ptr, self.id, idx, k or 0))
end

------------------------------------------------------------------------
-- Series handles: family:labels(...) resolves the label values once.

local Handle = {}
Handle.__index = Handle

local function handle_idx(h)
    local f = h.family
    local z = f.zone
    local e = z.epoch_ptr[0]
    if h.epoch == e then
        return h.idx
    end
    local idx, err = series(f, h.lv)
    if not idx then
        return nil, err
    end
    h.idx = idx
    h.epoch = e
    return idx
end

--- family:labels(v1, v2, ...) -> handle | nil, err
function Family:labels(...)
    local lv = { ... }
    local idx, err = series(self, lv)
    if not idx then
        return nil, err
    end
    return setmetatable({ family = self, lv = lv, idx = idx,
                          epoch = self.zone.epoch }, Handle)
end

--- handle:inc(value?) (counters, gauges)
function Handle:inc(v)
    local f = self.family
    if v == nil then
        v = 1
    end
    local ok
    if f.kind == KIND_COUNTER then
        ok = check_inc(v)
    else
        ok = f.kind == KIND_GAUGE and check_finite(v)
    end
    if not ok then
        return bad(f, ERR_BAD_VALUE, "bad increment " .. tostring(v))
    end
    local idx, err = handle_idx(self)
    if not idx then
        return nil, err
    end
    if f.kind == KIND_COUNTER then
        add(f.zone, idx, v)
    else
        gauge_add(f, idx, v)
    end
    return true
end

--- handle:dec(value?) (gauges)
function Handle:dec(v)
    local f = self.family
    if v == nil then
        v = 1
    end
    if f.kind ~= KIND_GAUGE or not check_finite(v) then
        return bad(f, ERR_BAD_VALUE, "bad decrement " .. tostring(v))
    end
    local idx, err = handle_idx(self)
    if not idx then
        return nil, err
    end
    gauge_add(f, idx, -v)
    return true
end

--- handle:set(value) (gauges)
function Handle:set(v)
    local f = self.family
    if f.kind ~= KIND_GAUGE or type(v) ~= "number" then
        return bad(f, ERR_BAD_VALUE, "bad gauge value " .. tostring(v))
    end
    local idx, err = handle_idx(self)
    if not idx then
        return nil, err
    end
    gauge_set(f, idx, v)
    return true
end

--- handle:observe(value) (histograms)
function Handle:observe(v)
    local f = self.family
    if f.kind ~= KIND_HISTOGRAM or not check_finite(v) then
        return bad(f, ERR_BAD_VALUE, "bad observation " .. tostring(v))
    end
    local idx, err = handle_idx(self)
    if not idx then
        return nil, err
    end
    observe(f, idx, v)
    return true
end

------------------------------------------------------------------------
-- Exposition

--- m:metric_data(format?) -> string | nil, err
-- format: "text" (Prometheus 0.0.4, default) or "openmetrics".
function Zone:metric_data(format)
    local fmt = 0
    if format == "openmetrics" then
        fmt = 1
    elseif format ~= nil and format ~= "text" then
        error("metric_data: format must be \"text\" or \"openmetrics\"", 2)
    end
    local out = ffi_new("uint8_t*[1]")
    local len = ffi_new("size_t[1]")
    local rc = C.shmprom_render(self.ptr, fmt, out, len, errbuf, ERRLEN)
    if rc ~= FFI_OK then
        C.shmprom_error_count(self.ptr, ERR_INTERNAL)
        return nil, "render failed: " .. errmsg()
    end
    local s = ffi_string(out[0], len[0])
    C.shmprom_buf_free(out[0], len[0])
    return s
end

-- Renders on a thread of the library while this request sleeps, so the
-- worker keeps serving; returns the render's pointer, length and handle
-- (release with C.shmprom_render_release). enc: 0 the text, 1 gzip.
local function render_async(z, fmt, enc, max_age)
    local out = ffi_new("const uint8_t*[1]")
    local len = ffi_new("size_t[1]")
    local handle = ffi_new("const void*[1]")
    local wait = 0.001
    -- a render that started after this scrape arrived, or within max_age
    -- before, will do
    local not_before = C.shmprom_clock_ns() - floor(max_age * 1e9)
    ngx.update_time()
    local deadline = ngx.now() + RENDER_TIMEOUT
    while true do
        local rc = C.shmprom_render_poll_enc(z.ptr, fmt, enc, not_before, out,
                                             len, handle, errbuf, ERRLEN)
        if rc == 1 then
            return out[0], tonumber(len[0]), handle[0]
        elseif rc ~= 0 then
            C.shmprom_error_count(z.ptr, ERR_INTERNAL)
            return nil, "render failed: " .. errmsg()
        end
        ngx.update_time()
        if ngx.now() > deadline then
            return nil, "render timed out"
        end
        ngx.sleep(wait)
        if wait < 0.016 then
            wait = wait * 2
        end
    end
end

-- Bytes handed to nginx at a time: between two pieces the request waits
-- for the client to take the data (ngx.flush(true)), then gives the worker
-- back to its event loop for a timer's turn (PRINT_PAUSE). A flush whose
-- data the socket took at once returns without yielding, so a client as
-- fast as loopback would otherwise get the whole exposition in one
-- stretch of the worker's time (~14 ms for 13.6 MB here); ngx.sleep(0)
-- does not help with a stock nginx (without OpenResty's posted delayed
-- events it resumes in the same pass of the event loop, before any timer
-- or new event). An HTTP/1.0 request gets the body in one piece: the lua
-- module buffers such a response whole (lua_http10_buffering, on by
-- default; flush is a no-op), and of several pieces printed it sent only
-- the first.
local PRINT_CHUNK = 256 * 1024
local PRINT_PAUSE = 0.001

-- Whether an Accept-Encoding header value accepts gzip: a "gzip" (or
-- "x-gzip") coding, else "*", with a q-value above 0.
local function accepts_gzip(ae)
    if not ae then
        return false
    end
    if type(ae) == "table" then -- the header given more than once
        ae = concat(ae, ",")
    end
    local star
    for item in ae:gmatch("[^,]+") do
        local coding, params = item:match("^%s*([%w%*%-]+)%s*(.*)$")
        if coding then
            coding = coding:lower()
            local q = 1
            local qv = params:match(";%s*[qQ]%s*=%s*([%d%.]+)")
            if qv then
                q = tonumber(qv) or 0
            end
            if coding == "gzip" or coding == "x-gzip" then
                return q > 0
            elseif coding == "*" then
                star = q > 0
            end
        end
    end
    return star or false
end
_M._accepts_gzip = accepts_gzip

--- m:collect(opts?)
-- content_by_lua*: prints the exposition with its Content-Type; OpenMetrics
-- when the Accept header asks for application/openmetrics-text. The render
-- runs off the worker's event loop and is sent in pieces; scrapes within
-- opts.max_age (default: the zone's render_cache option, 0) of a render
-- share it. A scraper whose Accept-Encoding takes gzip gets the render
-- gzip-compressed (by the render thread, shared with the render) unless
-- the zone's gzip option is false.
function Zone:collect(opts)
    local accept = ngx.var.http_accept
    local om = accept and str_find(accept, "application/openmetrics-text", 1,
                                   true)
    local ct = om and CT_OPENMETRICS or CT_TEXT
    if not self.render_thread then
        local body, err = self:metric_data(om and "openmetrics" or "text")
        if not body then
            ngx.status = 500
            ngx.log(ngx.ERR, "shmprom: ", err)
            ngx.say(err)
            return
        end
        ngx.header["Content-Type"] = ct
        ngx.print(body)
        return
    end
    local max_age = opts and opts.max_age or self.render_cache
    local gz = self.gzip and accepts_gzip(ngx.var.http_accept_encoding)
    local ptr, len, handle = render_async(self, om and 1 or 0, gz and 1 or 0,
                                          max_age)
    if not ptr then
        ngx.status = 500
        ngx.log(ngx.ERR, "shmprom: ", len)
        ngx.say(len)
        return
    end
    ngx.header["Content-Type"] = ct
    if self.gzip then
        ngx.header["Vary"] = "Accept-Encoding"
    end
    if gz then
        ngx.header["Content-Encoding"] = "gzip"
    end
    local version = ngx.req.http_version() -- nil when nginx does not know it
    if len <= PRINT_CHUNK or not version or version < 1.1 then
        ngx.print(ffi_string(ptr, len))
    else
        local off = 0
        while off < len do
            local n = len - off
            if n > PRINT_CHUNK then
                n = PRINT_CHUNK
            end
            local ok = ngx.print(ffi_string(ptr + off, n))
            off = off + n
            if not ok or (off < len and not ngx.flush(true)) then
                break -- the client went away
            end
            if off < len then
                ngx.sleep(PRINT_PAUSE)
            end
        end
    end
    C.shmprom_render_release(handle)
end

--- m:check() -> summary | nil, err
-- Runs the zone's consistency check.
function Zone:check()
    local rc = C.shmprom_check(self.ptr, errbuf, ERRLEN)
    if rc ~= FFI_OK then
        return nil, errmsg()
    end
    return errmsg()
end

--- m:gateway_hooks(families) -> cdata shmprom_gw_hooks | nil, err
-- The hooks of this process's recorder of the file-system gateway preset,
-- for the nginx module (nginx-module/): `families` are the preset's ten
-- families in the order of src/gateway.rs FAMILIES. Used by
-- resty.shmprom.gateway's init(); call it in init_by_lua*.
function Zone:gateway_hooks(families)
    if type(families) ~= "table" or #families ~= 10 then
        return nil, "gateway_hooks needs the preset's 10 families"
    end
    local ids = ffi_new("uint32_t[10]")
    for i = 1, 10 do
        ids[i - 1] = families[i].id
    end
    local gw = C.shmprom_gw_open(self.ptr, ids, 10, errbuf, ERRLEN)
    if gw == nil then
        return nil, errmsg()
    end
    local hooks = ffi_new("shmprom_gw_hooks")
    if C.shmprom_gw_get_hooks(gw, hooks) ~= FFI_OK then
        return nil, "shmprom_gw_get_hooks failed"
    end
    return hooks
end

_M.CONTENT_TYPE_TEXT = CT_TEXT
_M.CONTENT_TYPE_OPENMETRICS = CT_OPENMETRICS

return _M
