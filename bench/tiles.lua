-- wrk script for bench/tiles.py: cycle through a fixed list of tile paths and print a JSON
-- summary when the run ends.
--
--   wrk -t1 -c64 -d15s --timeout 5s -s bench/tiles.lua http://127.0.0.1:PORT -- PATHS_FILE
--
-- PATHS_FILE holds one request path per line (e.g. /tiles/bahamas/14/4640/7040.png). Every
-- request is formatted once in init(), so request() only hands out a prebuilt string and the
-- script costs wrk as little as possible. Each wrk thread walks the whole list in order.
--
-- done() prints one line "TILES_BENCH_JSON {...}" with: requests, duration_us, bytes, the wrk
-- error counters (connect, read, write, timeout, and non2xx = responses with status > 399) and
-- latency mean/max/p50/p90/p99 in microseconds.

local requests = {}
local count = 0
local index = 0

function init(args)
  local name = args[1]
  if name == nil then
    error("tiles.lua: pass the paths file after the URL: wrk ... URL -- PATHS_FILE")
  end
  local file = assert(io.open(name, "r"))
  for line in file:lines() do
    if #line > 0 then
      count = count + 1
      requests[count] = wrk.format("GET", line)
    end
  end
  file:close()
  if count == 0 then
    error("tiles.lua: no paths in " .. name)
  end
end

function request()
  index = index % count + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'TILES_BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"non2xx": %d, "latency_mean_us": %.1f, "latency_max_us": %d, ' ..
    '"latency_p50_us": %d, "latency_p90_us": %d, "latency_p99_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
