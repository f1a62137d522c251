-- wrk script of the benchmark suite (bench/run.py sets the environment).
--
--   BENCH_METHOD  request method (default GET)
--   BENCH_BODY    JSON request body, sent with Content-Type: application/json (default none)
--   BENCH_TOKEN   bearer token, sent as Authorization: Bearer <token> (default none)
--
-- Every request is the same, so wrk builds it once (no per-request Lua). At the end, one
-- machine-readable line: "BENCH_RESULT {json}" with latencies in microseconds.

wrk.method = os.getenv("BENCH_METHOD") or "GET"

local body = os.getenv("BENCH_BODY") or ""
if body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

local token = os.getenv("BENCH_TOKEN") or ""
if token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, errors.connect, errors.read, errors.write, errors.status, errors.timeout
  ))
end
