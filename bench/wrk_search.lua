-- wrk script for bench/bench_server.py: GET /api/search with a distinct query text on every request.
--
-- Usage: wrk -t T -c C -d Ds --latency --timeout 10s -s bench/wrk_search.lua URL -- RUN_TAG [K]
--
-- Query n of thread t in run RUN_TAG is "photo of thing RUN_TAG t n", so no two requests of any run (warm-ups
-- included, as long as each wrk invocation gets its own RUN_TAG) share a text: the server's text-embedding LRU
-- cache never hits and every request pays for one text encode. Responses outside 2xx are counted per thread
-- (wrk's own summary.errors.status only counts statuses above 399).
--
-- done() prints one line "JSON {...}" for the caller to parse: requests, duration_s, requests_per_s, latency
-- percentiles in milliseconds, non2xx, and wrk's socket errors (connect, read, write, status, timeout).

local DEFAULT_K = "10"
local PERCENTILES = { 50, 90, 99 }
local US_PER_MS = 1000.0
local US_PER_S = 1000000.0

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

-- per-thread state (each wrk thread runs its own copy of this script)
local run_tag = "r0"
local k = DEFAULT_K
local counter = 0
non2xx = 0  -- global, so that done() can read it with thread:get()

function init(args)
   run_tag = args[1] or run_tag
   k = args[2] or DEFAULT_K
end

function request()
   counter = counter + 1
   local path = string.format("/api/search?q=photo%%20of%%20thing%%20%s%%20%d%%20%d&k=%s", run_tag, id, counter, k)
   return wrk.format("GET", path)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local bad = 0
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("non2xx") or 0)
   end
   local duration_s = summary.duration / US_PER_S
   local parts = {
      string.format('"requests": %d', summary.requests),
      string.format('"duration_s": %.3f', duration_s),
      string.format('"requests_per_s": %.3f', summary.requests / duration_s),
      string.format('"bytes": %d', summary.bytes),
      string.format('"non2xx": %d', bad),
      string.format('"latency_mean_ms": %.3f', latency.mean / US_PER_MS),
      string.format('"latency_max_ms": %.3f', latency.max / US_PER_MS),
   }
   for _, p in ipairs(PERCENTILES) do
      table.insert(parts, string.format('"latency_p%d_ms": %.3f', p, latency:percentile(p) / US_PER_MS))
   end
   for _, name in ipairs({ "connect", "read", "write", "status", "timeout" }) do
      table.insert(parts, string.format('"%s": %d', name, summary.errors[name]))
   end
   io.write("JSON {" .. table.concat(parts, ", ") .. "}\n")
end
