"""The OpenAI-compatible server as users run it: ``pagedllm serve`` in a subprocess on a
loopback port, driven by the official ``openai`` client (sync and async) and by httpx.

Most tests share one server on a tiny random Llama with the tiny word-level tokenizer (and
its chat template): they check the protocol, that greedy answers equal the offline
``LLM.generate``/``LLM.chat`` on the same weights, streaming, errors, auth and metrics.  Two
more servers are started for overload (``--max-waiting``) and for SIGTERM.  The ``slow``
test serves the real SmolLM2 from a thread and asks it about Paris.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import CORPUS, build_tiny_chat_model  # noqa: E402

KEY = "test-key-123"
ENGINE_ARGS = ["--num-kv-blocks", "512", "--block-size", "8", "--max-model-len", "512",
               "--max-num-seqs", "64"]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
WORDS = " ".join(CORPUS).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m pagedllm.cli serve ...`` on 127.0.0.1, its output in a file."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        # One torch thread: this machine's few cores are shared with the test process.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.cli", "serve", *args, "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-uvicorn-access-log"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama over the tiny tokenizer."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("logs"), "--model", str(model_dir),
                        *ENGINE_ARGS, "--api-key", KEY).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def name(model_dir) -> str:
    return model_dir.name  # the served name: the model path's basename


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(model_dir) -> LLM:
    return LLM(model=str(model_dir), device="cpu", num_kv_blocks=512, block_size=8,
               max_model_len=512)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                              timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def scrape(server) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}, label model_name dropped."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "").replace(",}", "}")
        values[key] = float(value)
    return values


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


def chat_of(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- start-up, models, health --------------------------------------------------------------
def test_startup_log_names_plugins_backend_dtype_and_kv_capacity(server):
    log = server.output()
    assert re.search(r"plugins: .*torch_attention \(pagedllm\)", log)
    assert "attention torch" in log and "dtype float32" in log
    assert "KV cache 512 blocks x 8 = 4096 tokens" in log
    assert f"at http://127.0.0.1:{server.port}/v1" in log and "API key required" in log


def test_models_health_and_version(server, client, name):
    models = client.models.list()
    assert [m.id for m in models.data] == [name]
    assert models.data[0].model_extra["max_model_len"] == 512
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
    assert httpx.get(f"{server.url}/version").json()["version"]


# ---- answers equal the offline API ------------------------------------------------------------
def test_completions_greedy_equal_offline_generate(client, name, offline):
    prompts = ["the quick brown fox", "what is the capital of france ?", "one two three"]
    want = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
    for prompt, ref in zip(prompts, want):
        r = client.completions.create(model=name, prompt=prompt, **GREEDY)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(ref.prompt_token_ids), 12, len(ref.prompt_token_ids) + 12)
    # A list of prompts, and token ids, in one request.
    batch = client.completions.create(model=name, prompt=prompts, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [o.outputs[0].text for o in want]
    assert batch.usage.completion_tokens == 36
    ids = client.completions.create(model=name, prompt=want[0].prompt_token_ids, **GREEDY)
    assert ids.choices[0].text == want[0].outputs[0].text


def test_chat_greedy_equals_offline_chat(client, name, offline):
    messages = [{"role": "system", "content": "a small model writes a short answer"},
                {"role": "user", "content": "what is the capital of france ?"}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    r = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                       max_completion_tokens=16)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)


# ---- streaming ---------------------------------------------------------------------------------
async def _stream_chat(ac, **kwargs) -> tuple[str, str, object]:
    stream = await ac.chat.completions.create(stream=True, **kwargs)
    parts, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert roles == ["assistant"]
    return "".join(parts), finish, usage


async def _stream_completion(ac, **kwargs) -> tuple[str, str, object]:
    stream = await ac.completions.create(stream=True, **kwargs)
    parts, finish, usage = [], None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    return "".join(parts), finish, usage


def test_streamed_text_equals_text_not_streamed(server, client, name):
    base = client.completions.create(model=name, prompt="hello , how are you", temperature=0,
                                     max_tokens=20, extra_body={"ignore_eos": True})
    words = base.choices[0].text.split()
    stop = f" {words[6]} "  # a stop string the answer reaches part-way
    cut = base.choices[0].text[:base.choices[0].text.index(stop)]

    async def main():
        async with async_client(server) as ac:
            results = {}
            for label, kwargs in {
                "chat": dict(messages=chat_of("hello , how are you ?"), max_tokens=20,
                             temperature=0, extra_body={"ignore_eos": True}),
                "chat-stop": dict(messages=chat_of("one two three"), max_tokens=20,
                                  temperature=0, stop=[stop]),
            }.items():
                full = await ac.chat.completions.create(model=name, **kwargs)
                streamed = await _stream_chat(ac, model=name, stream_options={"include_usage": True},
                                              **kwargs)
                results[label] = (full, streamed)
            for label, kwargs in {
                "completion": dict(prompt="hello , how are you", max_tokens=20, temperature=0,
                                   extra_body={"ignore_eos": True}),
                "completion-stop": dict(prompt="hello , how are you", max_tokens=20,
                                        temperature=0, stop=stop,
                                        extra_body={"ignore_eos": True}),
            }.items():
                full = await ac.completions.create(model=name, **kwargs)
                streamed = await _stream_completion(
                    ac, model=name, stream_options={"include_usage": True}, **kwargs)
                results[label] = (full, streamed)
            return results

    results = asyncio.run(main())
    for label, (full, (text, finish, usage)) in results.items():
        choice = full.choices[0]
        full_text = choice.message.content if label.startswith("chat") else choice.text
        assert text == full_text, label
        assert finish == choice.finish_reason, label
        assert usage.completion_tokens == full.usage.completion_tokens, label
        assert usage.prompt_tokens == full.usage.prompt_tokens, label
    full = results["completion-stop"][0].choices[0]
    assert full.text == cut and full.finish_reason == "stop"
    assert full.model_extra["stop_reason"] == stop


def test_stream_sends_sse_ending_in_done_with_usage_last(server, name):
    body = {"model": name, "prompt": "one two", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(),
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert all(json.loads(e[6:])["usage"] is None for e in events[:-2])


def test_48_concurrent_streams_are_all_correct(server, name, offline):
    convs = [chat_of(" ".join(WORDS[(7 * i) % 40:(7 * i) % 40 + 3 + i % 5])) for i in range(48)]
    want = [o.outputs[0].text for o in offline.chat(
        convs, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)]

    async def one(ac, conv):
        stream = await ac.chat.completions.create(model=name, messages=conv, temperature=0,
                                                  max_tokens=24, stream=True,
                                                  extra_body={"ignore_eos": True})
        parts, first = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), first, time.monotonic()

    async def main():
        async with async_client(server) as ac:
            return await asyncio.gather(*(one(ac, c) for c in convs))

    results = asyncio.run(main())
    assert [text for text, _, _ in results] == want
    # Continuous batching: the streams produced tokens at the same time, not one by one.
    overlap = max(sum(1 for _, f, e in results if f <= t < e) for _, t, _ in results)
    assert overlap >= 12, f"at most {overlap} streams were generating at once"


# ---- request fields ----------------------------------------------------------------------------
def test_n_choices_with_seed(server, client, name):
    kwargs = dict(model=name, messages=chat_of("tell me one two three"), temperature=1.0,
                  max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    three = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24
    one = client.chat.completions.create(n=1, **kwargs)
    assert one.choices[0].message.content == three.choices[0].message.content
    again = client.chat.completions.create(n=3, **kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    texts = {c.message.content for c in three.choices}
    assert len(texts) > 1  # seeds differ per choice

    async def stream_n():
        async with async_client(server) as ac:
            stream = await ac.chat.completions.create(n=3, stream=True, **kwargs)
            parts = {0: [], 1: [], 2: []}
            async for chunk in stream:
                for ch in chunk.choices:
                    parts[ch.index].append(ch.delta.content or "")
            return ["".join(parts[i]) for i in range(3)]

    assert asyncio.run(stream_n()) == [c.message.content for c in three.choices]
    # Completions: two prompts x n=2 -> choices 0..3, prompt-major.
    two = client.completions.create(model=name, prompt=["one two", "the quick"], n=2, seed=3,
                                    temperature=1.0, max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.completion_tokens == 16


def test_logprobs(client, name):
    r = client.chat.completions.create(model=name, messages=chat_of("one two"), temperature=0,
                                       max_tokens=6, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the most likely
    c = client.completions.create(model=name, prompt="one two", temperature=0, max_tokens=5,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)


def test_vllm_sampling_extras_are_honoured(client, name):
    base = dict(model=name, prompt="the quick brown", max_tokens=10)
    r = client.completions.create(temperature=0, extra_body={"min_tokens": 10}, **base)
    assert r.usage.completion_tokens == 10  # EOS is banned until min_tokens
    # top_k=1 is greedy whatever the temperature; repetition_penalty changes the answer.
    greedy = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **base)
    top1 = client.completions.create(temperature=1.5, extra_body={"top_k": 1, "ignore_eos": True},
                                     **base)
    assert top1.choices[0].text == greedy.choices[0].text
    rep = client.completions.create(temperature=0, extra_body={"repetition_penalty": 1.8,
                                                               "min_p": 0.1, "ignore_eos": True},
                                    **base)
    assert rep.usage.completion_tokens == 10


def test_tokenize_and_detokenize(server, client, name):
    tok = httpx.post(f"{server.url}/tokenize", headers=auth(),
                     json={"model": name, "prompt": "the quick brown fox"}).json()
    assert tok["count"] == len(tok["tokens"]) == 4 and tok["max_model_len"] == 512
    text = httpx.post(f"{server.url}/detokenize", headers=auth(),
                      json={"model": name, "tokens": tok["tokens"]}).json()["prompt"]
    assert text == "the quick brown fox"
    chat = httpx.post(f"{server.url}/tokenize", headers=auth(),
                      json={"messages": chat_of("one two")}).json()
    r = client.chat.completions.create(model=name, messages=chat_of("one two"), max_tokens=1)
    assert chat["count"] == r.usage.prompt_tokens


# ---- errors ------------------------------------------------------------------------------------
def test_api_key_is_required_when_set(server, name):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": "a"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapers need no key


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(n=1000), "n"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(extra_body={"min_tokens": 20}, max_tokens=10), "min_tokens"),
])
def test_invalid_fields_are_400_naming_the_field(client, name, kwargs, param):
    kwargs = {"messages": chat_of("hi"), **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=name, **kwargs)
    assert exc.value.status_code == 400
    assert exc.value.param == param, exc.value.body
    assert exc.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in exc.value.body["message"]


def test_other_errors(server, client, name):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4", messages=chat_of("hi"))
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=name, prompt=[1, 2, 10**6])
    assert exc.value.param == "prompt_token_ids"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=name, prompt="a", stream=True, n=1,
                                  extra_body={"best_of": 3})
    assert exc.value.param == "best_of"
    r = httpx.post(f"{server.url}/v1/completions", headers={**auth(), "content-type":
                                                           "application/json"}, content=b"{not")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/v1/nothing", headers=auth()).status_code == 404


# ---- metrics and disconnects -------------------------------------------------------------------
def test_metrics(server, client, name):
    before = scrape(server)
    client.completions.create(model=name, prompt="one two three", **GREEDY)
    after = scrape(server)
    for metric in ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting",
                   "pagedllm:kv_cache_usage_perc", "pagedllm:prefix_cache_hit_rate"):
        assert metric in after, metric
    assert after["pagedllm:generation_tokens_total"] - before.get(
        "pagedllm:generation_tokens_total", 0) == 12
    assert after["pagedllm:prompt_tokens_total"] - before.get("pagedllm:prompt_tokens_total", 0) == 3
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        count = f"pagedllm:{hist}_count"
        assert after[count] > before.get(count, 0), hist
    assert after['pagedllm:request_success_total{finished_reason="length"}'] >= 1
    assert after["pagedllm:kv_cache_usage_perc"] == 0.0
    assert 0.0 <= after["pagedllm:prefix_cache_hit_rate"] <= 1.0


def test_client_disconnect_aborts_and_frees_blocks(server, name):
    key = 'pagedllm:request_success_total{finished_reason="abort"}'
    aborted = scrape(server).get(key, 0)
    body = {"model": name, "prompt": "the quick brown", "max_tokens": 490, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(),
                      timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert scrape(server)["pagedllm:num_requests_running"] == 1
    # Gone mid-stream: the request is aborted and its blocks are back.
    wait_until(lambda: scrape(server).get(key, 0) == aborted + 1, what="stream abort")
    m = scrape(server)
    assert m["pagedllm:num_requests_running"] == 0 and m["pagedllm:kv_cache_usage_perc"] == 0
    # A non-streaming client that gives up is noticed too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False},
                   headers=auth(), timeout=0.2)
    wait_until(lambda: scrape(server).get(key, 0) == aborted + 2, what="non-stream abort")
    assert scrape(server)["pagedllm:kv_cache_usage_perc"] == 0


# ---- the load generator and the command line ------------------------------------------------
def test_bench_serve_reports_throughput_and_latency(server):
    before = scrape(server)["pagedllm:generation_tokens_total"]
    r = subprocess.run(
        [sys.executable, "-m", "pagedllm.cli", "bench", "serve", "--base-url", server.url,
         "--api-key", KEY, "--num-requests", "6", "--prompt-len", "16", "--output-len", "8",
         "--rate", "50", "inf", "--json"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["rate"] for row in rows] == [50, "inf"]
    for row in rows:
        assert (row["completed"], row["failed"]) == (6, 0), row["errors"]
        assert 6 * 6 <= row["total_output_tokens"] <= 6 * 10  # 8 +- 25 %, exact with ignore_eos
        assert row["request_throughput"] > 0 and row["output_throughput"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
    assert rows[0]["total_output_tokens"] == rows[1]["total_output_tokens"]  # one workload
    after = scrape(server)["pagedllm:generation_tokens_total"]
    assert after - before == 2 * rows[0]["total_output_tokens"]


def test_bench_workload_shapes():
    import random
    import statistics

    from pagedllm.bench.serve import arrival_times, make_workload

    w = make_workload(list(range(10, 50)), 400, 1024, 128, 0.25, max_model_len=1200, seed=0)
    assert all(768 <= len(p) <= 1200 - o for p, o in zip(w.prompts, w.output_lens))
    assert all(96 <= o <= 160 for o in w.output_lens)
    times = arrival_times(random.Random(0), 2000, rate=4.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert abs(statistics.mean(gaps) - 0.25) < 0.03  # Poisson: exponential gaps of mean 1/R
    assert arrival_times(random.Random(0), 3, float("inf")) == [0.0, 0.0, 0.0]


def test_serve_flags_are_checked_before_loading(capsys):
    from pagedllm import cli

    assert cli.main(["serve", "--max-waiting", "0"]) == cli.EXIT_USAGE
    assert "max-waiting: must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "a", "--model", "b"]) == cli.EXIT_USAGE
    assert "given twice" in capsys.readouterr().err


# ---- overload and shutdown ---------------------------------------------------------------------
def test_overload_is_503_with_retry_after(model_dir, tmp_path):
    srv = ServerProcess(tmp_path, "--model", str(model_dir), *ENGINE_ARGS[:6],
                        "--max-num-seqs", "1", "--max-waiting", "1").wait_ready()
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0,
                           timeout=60) as c:
            name = model_dir.name
            long = dict(model=name, prompt="one two", max_tokens=490, temperature=0, stream=True,
                        extra_body={"ignore_eos": True})
            running = c.completions.create(**long)
            next(iter(running))  # it runs: the only sequence slot is taken
            waiting = c.completions.create(**{**long, "max_tokens": 3})  # accepted, waits
            with pytest.raises(openai.InternalServerError) as exc:
                c.completions.create(model=name, prompt="one", max_tokens=2)
            assert exc.value.status_code == 503
            assert exc.value.response.headers["retry-after"] == "1"
            assert exc.value.code == "overloaded"
            running.close()  # frees the slot: the waiting request runs, new ones are welcome
            assert sum(len(ch.choices) for ch in waiting) >= 1
            ok = c.completions.create(model=name, prompt="one", max_tokens=2)
            assert ok.usage.completion_tokens >= 1
    finally:
        srv.stop()


def test_sigterm_drains_running_requests_then_exits(tmp_path):
    # A long context, so that the long request cannot finish inside the shutdown timeout on
    # a fast machine (the 2-layer model decodes about a thousand tokens a second on CPU).
    model_dir = build_tiny_chat_model(tmp_path / "long-context", max_position_embeddings=16384)
    srv = ServerProcess(tmp_path, "--model", str(model_dir), "--block-size", "8",
                        "--max-model-len", "16384", "--shutdown-timeout", "1.5").wait_ready()
    name = model_dir.name
    body = {"model": name, "prompt": "one two", "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    def events(max_tokens, started, out):
        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=60,
                          json={**body, "max_tokens": max_tokens}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    out.append(line[6:])

    runs = {}
    for label, max_tokens in (("short", 30), ("long", 16000)):
        started, out = threading.Event(), []
        t = threading.Thread(target=events, args=(max_tokens, started, out), daemon=True)
        t.start()
        runs[label] = (t, started, out)
    for _, started, _ in runs.values():
        assert started.wait(30)
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in srv.output(), what="drain log")
    try:
        status = httpx.get(f"{srv.url}/health", timeout=5).status_code
    except httpx.TransportError:
        status = None  # the listening socket is already closed
    assert status in (None, 503)
    assert srv.proc.wait(30) == 0
    for t, _, _ in runs.values():
        t.join(10)
    finish, usage = {}, {}
    for label, (_, _, out) in runs.items():
        assert out[-1] == "[DONE]", label
        chunks = [json.loads(e) for e in out[:-1]]
        finish[label] = next(c["choices"][0]["finish_reason"] for c in chunks
                             if c["choices"] and c["choices"][0]["finish_reason"])
        usage[label] = chunks[-1]["usage"]["completion_tokens"]
    # The short request finished whole during the drain; the long one outlived the shutdown
    # timeout and was aborted, its stream still closed properly.
    assert (finish["short"], usage["short"]) == ("length", 30)
    assert finish["long"] == "abort" and usage["long"] < 16000
    log = srv.output()
    assert "shutdown timeout reached: aborting 1" in log and "shut down" in log
    srv.stop()


# ---- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_answers_paris_over_http(smollm2_llm):
    import uvicorn

    from pagedllm.async_engine import AsyncLLMEngine
    from pagedllm.server.app import ServerSettings, build_app
    from pagedllm.server.launcher import default_served_name
    from pagedllm.server.metrics import ServerMetrics

    messages = chat_of("What is the capital of France?")
    params = SamplingParams(temperature=0, max_tokens=24)
    offline_text = smollm2_llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    name = default_served_name(None)
    metrics = ServerMetrics(name)
    engine = AsyncLLMEngine(smollm2_llm.engine, observer=metrics)
    metrics.attach(engine)
    app = build_app(engine, ServerSettings([name]), metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=60, what="server start")
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=120) as c:
            assert name == "SmolLM2-135M-Instruct"
            r = c.chat.completions.create(model=name, messages=messages, temperature=0,
                                          max_tokens=24)
            answer = r.choices[0].message.content
            assert "Paris" in answer and answer == offline_text
            parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=name, messages=messages, temperature=0, max_tokens=24, stream=True)
                if ch.choices]
            assert "".join(parts) == answer
    finally:
        server.should_exit = True
        thread.join(30)
    assert not engine.is_running
    assert smollm2_llm.stats()["kv_blocks_free"] == smollm2_llm.stats()["kv_blocks_total"]
