-- wrk script for bench (f): GET /p/<id>.
--   wrk ... -s paths.lua URL -- old            ids cycle over 0..9999
--   wrk ... -s paths.lua URL -- new BASE N     each thread first sends N
--                                             new ids (BASE + ...), then
--                                             cycles over 0..9999
local counter = 0
local mode, base, nnew = "old", 0, 0
local nthreads = 0

function setup(thread)
    nthreads = nthreads + 1
    thread:set("tid", nthreads)
end

function init(args)
    mode = args[1] or "old"
    base = tonumber(args[2] or 0)
    nnew = tonumber(args[3] or 0)
end

function request()
    counter = counter + 1
    local id
    if mode == "new" and counter <= nnew then
        id = base + (tid - 1) * nnew + counter
    else
        id = counter % 10000
    end
    return wrk.format(nil, "/p/" .. id)
end
