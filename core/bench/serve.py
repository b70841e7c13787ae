"""``pagedllm bench serve``: W3 of BENCHMARKS.md, online serving under Poisson load.

    pagedllm bench serve --base-url http://127.0.0.1:8000 --rate 2 4 8 inf --num-requests 1000

For each rate it sends ``--num-requests`` streaming ``/v1/completions`` requests with Poisson
arrivals (``inf``: all at once): prompts of random token ids (drawn from what the server's
``/tokenize`` makes of a short English text, so every id is a real token; ids 100..999 when
the server has no tokenizer), lengths uniform in ``prompt-len * (1 ± range-ratio)`` and
``output-len * (1 ± range-ratio)``, greedy, with ``ignore_eos`` so output lengths are exact.
Every rate gets the same lengths but its own token ids, so no rate finds the previous one's
prompts in the prefix cache.  It prints request throughput, output tokens per
second, time to first token and time per output token (after the first) at p50 and p99.

The client is a small HTTP/1.1 client on asyncio streams (standard library only), so the
benchmark runs wherever pagedllm is installed and measures the server, not a client
library; any server that speaks OpenAI's streaming completions API (vLLM's too) works.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

# W3's defaults.
NUM_REQUESTS = 1000
PROMPT_LEN = 1024
OUTPUT_LEN = 128
RANGE_RATIO = 0.25

TOKEN_SOURCE_TEXT = (
    "The history of science is the study of the development of science and scientific "
    "knowledge, including both the natural and social sciences. Science is a body of "
    "empirical, theoretical, and practical knowledge about the natural world, produced by "
    "scientists who emphasize the observation, explanation, and prediction of real-world "
    "phenomena. Rivers carry water from mountains to the sea; trains cross bridges over "
    "valleys; bees visit gardens in the morning, and the moon rises over quiet forests. "
    "one two three four five six seven eight nine ten hello how are you today fine thank "
    "the quick brown fox jumps over the lazy dog what is the capital of france paris")


# ---- a minimal HTTP/1.1 client -----------------------------------------------------------------
class HTTPError(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status


@dataclass
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str
    api_key: str | None = None

    @classmethod
    def parse(cls, base_url: str, api_key: str | None) -> Endpoint:
        u = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if u.scheme not in ("http", "https"):
            raise ValueError(f"base-url: scheme must be http or https, got {u.scheme!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        path = u.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3]
        return cls(u.scheme, u.hostname or "127.0.0.1", port, path, api_key)

    async def open(self, method: str, path: str, payload: dict | None):
        """Send one request; return (status, headers, reader, writer) after the headers."""
        ctx = ssl.create_default_context() if self.scheme == "https" else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx)
        body = b"" if payload is None else json.dumps(payload).encode()
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Connection: close", "Accept: application/json, text/event-stream",
                 f"Content-Length: {len(body)}"]
        if payload is not None:
            lines.append("Content-Type: application/json")
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split()
        if len(parts) < 2:
            writer.close()
            raise ConnectionError(f"bad HTTP status line {status_line!r}")
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers, reader, writer

    @staticmethod
    async def body_chunks(headers: dict, reader: asyncio.StreamReader):
        """The body as it arrives (chunked, sized, or until the connection closes)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    return
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    return
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield data
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if n:
                yield await reader.readexactly(n)
        else:
            while chunk := await reader.read(65536):
                yield chunk

    async def json(self, method: str, path: str, payload: dict | None = None) -> dict:
        status, headers, reader, writer = await self.open(method, path, payload)
        try:
            body = b"".join([c async for c in self.body_chunks(headers, reader)])
        finally:
            writer.close()
        if status != 200:
            raise HTTPError(status, body)
        return json.loads(body) if body else {}


# ---- the workload ----------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def uniform_lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def make_workload(token_pool: list[int], num_requests: int, prompt_len: int, output_len: int,
                  range_ratio: float, max_model_len: int | None, seed: int) -> Workload:
    rng = random.Random(seed)
    p_lens = uniform_lengths(rng, num_requests, prompt_len, range_ratio)
    o_lens = uniform_lengths(rng, num_requests, output_len, range_ratio)
    if max_model_len:  # the server would refuse what does not fit: shorten the prompt
        p_lens = [max(1, min(p, max_model_len - o)) for p, o in zip(p_lens, o_lens)]
    prompts = [[rng.choice(token_pool) for _ in range(n)] for n in p_lens]
    return Workload(prompts, o_lens)


def fresh_tokens(workload: Workload, token_pool: list[int], seed: int) -> Workload:
    """The same lengths with new token ids: each rate gets prompts of its own, so the
    server's prefix cache cannot serve one rate's prompts from the run before."""
    rng = random.Random(seed)
    return Workload([[rng.choice(token_pool) for _ in p] for p in workload.prompts],
                    workload.output_lens)


def arrival_times(rng: random.Random, n: int, rate: float) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def run_one(ep: Endpoint, model: str, prompt: list[int], max_tokens: int,
                  timeout: float) -> RequestResult:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(False, len(prompt))
    start = time.perf_counter()
    conn: list = []

    async def stream() -> None:
        status, headers, reader, writer = await ep.open("POST", "/v1/completions", payload)
        conn.append(writer)
        if status != 200:
            body = b"".join([c async for c in ep.body_chunks(headers, reader)])
            raise HTTPError(status, body)
        buffer, chunks, done = b"", 0, False
        async for data in ep.body_chunks(headers, reader):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    text = line[5:].strip()
                    if text == b"[DONE]":
                        done = True
                        continue
                    msg = json.loads(text)
                    if "error" in msg:
                        raise RuntimeError(msg["error"].get("message"))
                    if msg.get("choices"):
                        chunks += 1
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - start
                    if msg.get("usage"):
                        result.output_tokens = msg["usage"]["completion_tokens"]
        if not done:
            raise ConnectionError("stream ended without [DONE]")
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True

    try:
        await asyncio.wait_for(stream(), timeout)
    except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for writer in conn:
            writer.close()
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RunSummary:
    rate: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_prompt_tokens: int
    total_output_tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    errors: list[str] = field(default_factory=list)


def summarize(rate: float, results: list[RequestResult], duration: float) -> RunSummary:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    tpots = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    errors = sorted({r.error for r in results if r.error})[:5]
    return RunSummary(
        rate=rate, num_requests=len(results), completed=len(ok), failed=len(results) - len(ok),
        duration_s=duration, request_throughput=len(ok) / duration if duration else 0.0,
        output_throughput=out_tokens / duration if duration else 0.0,
        total_prompt_tokens=sum(r.prompt_len for r in ok), total_output_tokens=out_tokens,
        ttft_p50_ms=percentile(ttfts, 50), ttft_p99_ms=percentile(ttfts, 99),
        tpot_p50_ms=percentile(tpots, 50), tpot_p99_ms=percentile(tpots, 99), errors=errors)


async def run_rate(ep: Endpoint, model: str, workload: Workload, rate: float, seed: int,
                   max_concurrency: int | None, timeout: float) -> RunSummary:
    times = arrival_times(random.Random(seed + 1), len(workload.prompts), rate)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def send(i: int) -> RequestResult:
        delay = start + times[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is None:
            return await run_one(ep, model, workload.prompts[i], workload.output_lens[i], timeout)
        async with limit:
            return await run_one(ep, model, workload.prompts[i], workload.output_lens[i], timeout)

    results = await asyncio.gather(*(send(i) for i in range(len(workload.prompts))))
    return summarize(rate, list(results), time.perf_counter() - start)


async def discover(ep: Endpoint, model: str | None) -> tuple[str, int | None, list[int]]:
    """The model name, its context length, and a pool of token ids to build prompts from."""
    models = (await ep.json("GET", "/v1/models")).get("data") or []
    if model is None:
        if not models:
            raise ValueError("model: the server lists no models; pass --model")
        model = models[0]["id"]
    card = next((m for m in models if m.get("id") == model), {})
    max_len = card.get("max_model_len")
    try:
        tokens = (await ep.json("POST", "/tokenize", {"model": model, "prompt": TOKEN_SOURCE_TEXT,
                                                      "add_special_tokens": False}))["tokens"]
    except Exception as exc:  # noqa: BLE001 - not every server has /tokenize
        print(f"bench serve: /tokenize failed ({exc}); prompts use token ids 100..999",
              file=sys.stderr)
        tokens = list(range(100, 1000))
    return model, max_len, sorted(set(tokens)) or list(range(100, 1000))


HEADER = (f"{'rate':>6} {'done':>6} {'fail':>5} {'secs':>8} {'req/s':>7} {'out tok/s':>10} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")


def format_row(s: RunSummary) -> str:
    return (f"{s.rate:>6g} {s.completed:>6} {s.failed:>5} {s.duration_s:>8.2f} "
            f"{s.request_throughput:>7.2f} {s.output_throughput:>10.1f} {s.ttft_p50_ms:>9.1f} "
            f"{s.ttft_p99_ms:>9.1f} {s.tpot_p50_ms:>9.2f} {s.tpot_p99_ms:>9.2f}")


async def bench(args: argparse.Namespace) -> list[RunSummary]:
    api_key = args.api_key or os.environ.get("PAGEDLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    ep = Endpoint.parse(args.base_url, api_key)
    model, max_len, pool = await discover(ep, args.model)
    workload = make_workload(pool, args.num_requests, args.prompt_len, args.output_len,
                             args.range_ratio, max_len, args.seed)
    n_prompt = sum(map(len, workload.prompts))
    n_out = sum(workload.output_lens)
    print(f"bench serve: {model} at {args.base_url}: {args.num_requests} requests, prompt "
          f"{args.prompt_len} ± {args.range_ratio:.0%} tokens ({n_prompt} in all), output "
          f"{args.output_len} ± {args.range_ratio:.0%} ({n_out}), streaming, greedy, ignore_eos",
          file=sys.stderr)
    summaries = []
    if not args.json:
        print(HEADER + "   (times in ms)")
    for k, rate in enumerate(args.rate):
        run_workload = workload if k == 0 else fresh_tokens(workload, pool, args.seed * 1000 + k)
        s = await run_rate(ep, model, run_workload, rate, args.seed, args.max_concurrency,
                           args.request_timeout)
        summaries.append(s)
        if args.json:
            row = asdict(s)
            row["rate"] = "inf" if math.isinf(s.rate) else s.rate  # JSON has no Infinity
            print(json.dumps(row), flush=True)
        else:
            print(format_row(s), flush=True)
        for err in s.errors:
            print(f"bench serve: rate {rate:g}: error: {err}", file=sys.stderr)
    return summaries


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server (default: %(default)s)")
    parser.add_argument("--model", help="served model name (default: the first /v1/models lists)")
    parser.add_argument("--api-key", help="bearer key (default: $PAGEDLLM_API_KEY or "
                                          "$OPENAI_API_KEY)")
    parser.add_argument("--rate", type=_rate, nargs="+", default=[float("inf")], metavar="R",
                        help="request rates (req/s) to run one after another; inf sends all at "
                             "once (default: inf)")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, metavar="N",
                        help="requests per rate (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN, metavar="N",
                        help="mean prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=OUTPUT_LEN, metavar="N",
                        help="mean output tokens (default: %(default)s)")
    parser.add_argument("--range-ratio", type=float, default=RANGE_RATIO, metavar="X",
                        help="lengths are uniform in mean * (1 ± X) (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="at most N requests in flight (default: no limit)")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="per-request timeout (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="one JSON summary per rate")


def check_arguments(args: argparse.Namespace) -> None:
    if args.num_requests < 1:
        raise ValueError(f"num-requests: must be >= 1, got {args.num_requests}")
    if args.prompt_len < 1 or args.output_len < 1:
        raise ValueError("prompt-len and output-len: must be >= 1")
    if not 0 <= args.range_ratio < 1:
        raise ValueError(f"range-ratio: must be in [0, 1), got {args.range_ratio}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"max-concurrency: must be >= 1, got {args.max_concurrency}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm bench serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(args)
    summaries = asyncio.run(bench(args))
    return 0 if all(s.completed for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
