-- wrk script for bench/run.py: one fixed GET per connection loop, optionally
-- through a forward proxy (absolute-form request line + Proxy-Authorization)
-- or a gateway (origin-form + Authorization),
-- optionally with a think time, exact non-2xx counting across threads, and a
-- single machine-readable result line.
--
-- Parameters come from the environment (read when the script is loaded):
--   BENCH_TARGET    request target: "/items/1" (origin-form, direct) or
--                   "http://127.0.0.1:PORT/items/1" (absolute-form, via proxy)
--   BENCH_HOST      Host header value (the upstream's host:port)
--   BENCH_AUTH      the agent credential header's value, or empty
--   BENCH_AUTH_HEADER  its name: Proxy-Authorization (forward proxy, the
--                   default) or Authorization (gateway)
--   BENCH_THINK_MS  mean per-connection pause after each response (0 = none);
--                   pauses are exponentially distributed (Poisson-like arrivals),
--                   so the connections do not phase-lock into bursts

local target = os.getenv("BENCH_TARGET") or "/"
local host = os.getenv("BENCH_HOST") or "127.0.0.1"
local auth = os.getenv("BENCH_AUTH") or ""
local auth_header = os.getenv("BENCH_AUTH_HEADER") or ""
if auth_header == "" then
   auth_header = "Proxy-Authorization"
end
local think = tonumber(os.getenv("BENCH_THINK_MS") or "0") or 0

wrk.method = "GET"
wrk.path = target
wrk.headers["Host"] = host
wrk.headers["User-Agent"] = "proctor-bench/wrk"
if auth ~= "" then
   wrk.headers[auth_header] = auth
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   -- wrk computes the Host header before calling init; keep ours.
   wrk.headers["Host"] = host
   responses = 0
   non2xx = 0
end

if think > 0 then
   -- each thread has its own Lua state: seed from a per-state table address
   math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003))
   function delay()
      return -think * math.log(1 - math.random())
   end
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local n, r = 0, 0
   for _, t in ipairs(threads) do
      n = n + t:get("non2xx")
      r = r + t:get("responses")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_us":%d,"responses":%d,"non2xx":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,' ..
      '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}\n',
      summary.requests, summary.duration, r, n,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max))
end
