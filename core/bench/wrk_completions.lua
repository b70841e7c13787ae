-- wrk script for cross-checking `pagedllm bench serve` with a load tool we did not write:
--   pagedllm serve --port 8765 --max-num-seqs 16
--   wrk -t1 -c16 -d40s -s core/bench/wrk_completions.lua http://127.0.0.1:8765/v1/completions
-- A fixed 64-token prompt, 32 greedy output tokens, EOS ignored (non-streaming).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local ids = {}
for i = 1, 64 do ids[i] = tostring(100 + (i * 37) % 5000) end
wrk.body = '{"model": "SmolLM2-135M-Instruct", "prompt": [' .. table.concat(ids, ",") ..
  '], "max_tokens": 32, "temperature": 0, "ignore_eos": true}'
