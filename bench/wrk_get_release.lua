-- A get/release mix for wrk. Each wrk thread is one host (w1, w2, ...); its
-- connections take turns asking /get/ then /release/ of a pool.
--
--   [WRK_COUNT=1] wrk ... -s wrk_get_release.lua URL -- [own|cycle|shared]
--
-- own (default): every thread cycles over 32 pools of its own (w1-p0 ...), so
--   every /get/ is YES (a host that already holds a slot is answered YES too)
--   and every /release/ OK.
-- cycle: every thread cycles over the same 32 pools (p0 ... p31): a /get/ of a
--   pool the other thread holds is NO.
-- shared: every thread asks for the one pool "p": one holder at a time.
-- WRK_COUNT=1 in the environment: also count the answers (YES, NO, OK,
--   other) and print them at the end as "answers: YES=... NO=... OK=... other=..."; reading each body in Lua
--   costs wrk some CPU, so the throughput figure is taken without it. (wrk
--   decides whether to read bodies before any thread's init() runs, so this is
--   an environment variable and not a script argument.)
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("host", "w" .. counter)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  mode = args[1] or "own"
  yes, no, ok, other = 0, 0, 0, 0
  if mode == "own" then
    prefix = host .. "-p"
  elseif mode == "cycle" then
    prefix = "p"
  elseif mode == "shared" then
    prefix = nil
  else
    error("unknown mode " .. mode)
  end
end

function request()
  n = n + 1
  local pool = prefix and (prefix .. (math.floor(n / 2) % 32)) or "p"
  local verb = (n % 2 == 0) and "get" or "release"
  return wrk.format("GET", "/" .. verb .. "/?host=" .. host .. "&pool=" .. pool)
end

local function count(status, headers, body)
  if status ~= 200 then
    other = other + 1
  elseif body == "YES" then
    yes = yes + 1
  elseif body == "NO" then
    no = no + 1
  elseif body == "OK" then
    ok = ok + 1
  else
    other = other + 1
  end
end

if os.getenv("WRK_COUNT") == "1" then
  response = count
end

function done(summary, latency, requests)
  local y, nn, o, x = 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    y = y + (thread:get("yes") or 0)
    nn = nn + (thread:get("no") or 0)
    o = o + (thread:get("ok") or 0)
    x = x + (thread:get("other") or 0)
  end
  if y + nn + o + x > 0 then
    io.write(string.format("answers: YES=%d NO=%d OK=%d other=%d\n", y, nn, o, x))
  end
end
