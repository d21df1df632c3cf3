-- A small JSON encoder for the benchmarks' replies (no cjson in Debian's
-- lua module): numbers, strings, booleans, arrays and string-keyed tables.

local type = type
local pairs = pairs
local concat = table.concat
local format = string.format
local sort = table.sort

local enc

local function str(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return format("\\u%04x", c:byte())
    end) .. '"'
end

enc = function(v)
    local t = type(v)
    if t == "number" then
        if v ~= v or v == math.huge or v == -math.huge then
            return "null"
        end
        if v == math.floor(v) and v > -1e15 and v < 1e15 then
            return format("%d", v)
        end
        return format("%.17g", v)
    elseif t == "string" then
        return str(v)
    elseif t == "boolean" then
        return tostring(v)
    elseif t == "table" then
        if #v > 0 or next(v) == nil then
            local out = {}
            for i = 1, #v do
                out[i] = enc(v[i])
            end
            return "[" .. concat(out, ",") .. "]"
        end
        local keys = {}
        for k in pairs(v) do
            keys[#keys + 1] = tostring(k)
        end
        sort(keys)
        local out = {}
        for i = 1, #keys do
            local k = keys[i]
            local x = v[k]
            if x == nil then
                x = v[tonumber(k)]
            end
            out[i] = str(k) .. ":" .. enc(x)
        end
        return "{" .. concat(out, ",") .. "}"
    end
    return "null"
end

return { encode = enc }
