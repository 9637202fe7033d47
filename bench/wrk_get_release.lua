-- A get/release mix for wrk: each wrk thread is one host cycling over 32 pools
-- (/get/ then /release/ of the same pool). Requests of one thread run on its
-- connections in any order, so answers are YES, NO and OK: all 200.
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("host", "w" .. counter)
end

function init(args)
  n = 0
end

function request()
  n = n + 1
  local pool = "p" .. (math.floor(n / 2) % 32)
  local verb = (n % 2 == 0) and "get" or "release"
  return wrk.format("GET", "/" .. verb .. "/?host=" .. host .. "&pool=" .. pool)
end
