"""The ``pagedllm`` command line, run as a user runs it: a subprocess, stdout and stderr apart.

Model-running tests use a tiny random Llama saved with a tiny word-level tokenizer, so they
check the plumbing (flags, streaming, history, exit codes), not the answers; the one test of
answers (``slow``) uses the default model, from ``$PAGEDLLM_CACHE_DIR`` or fetched.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

# Small engine settings keep the tiny model's start-up and KV cache cheap.
TINY_ENGINE = ["--num-kv-blocks", "16", "--block-size", "8", "--max-model-len", "128"]


def run_cli(*args: str, stdin: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pagedllm.cli ARGS``; inherits the environment (PAGEDLLM_CACHE_DIR...)."""
    return subprocess.run([sys.executable, "-m", "pagedllm.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama whose vocabulary is the tiny tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ---- plugins ------------------------------------------------------------------------------
def test_plugins_table_lists_builtin_plugins_with_their_package():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "plugin", "package"]
    rows = {tuple(line.split()) for line in lines[2:]}
    assert ("attention", "torch", "torch_attention", "pagedllm") in rows
    assert ("scheduler", "fcfs", "fcfs_scheduler", "pagedllm") in rows
    assert ("model", "LlamaForCausalLM", "llama_models", "pagedllm") in rows
    assert "pagedllm: model" not in result.stderr  # no model was loaded


def test_plugins_json_parses():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"kind": "scheduler", "name": "fcfs", "plugin": "fcfs_scheduler",
            "package": "pagedllm"} in rows
    assert all(set(r) == {"kind", "name", "plugin", "package"} for r in rows)


# ---- errors -------------------------------------------------------------------------------
def test_bad_sampling_value_exits_2_naming_the_field():
    result = run_cli("generate", "hello", "--temperature", "-1", "--model", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.startswith("pagedllm: error: temperature")  # checked before the model
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unknown_model_path_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli("chat", "--model", str(missing), stdin="hi\n")
    assert result.returncode == 2
    assert "pagedllm: error:" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_plugin_exits_2_listing_installed_ones(tiny_model):
    result = run_cli("generate", "hi", "--model", str(tiny_model), "--scheduler", "nope")
    assert result.returncode == 2
    assert "nope" in result.stderr and "fcfs" in result.stderr
    assert "Traceback" not in result.stderr


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="checks the error when no GPU is there")
def test_cuda_device_without_a_gpu_exits_2():
    result = run_cli("generate", "hi", "--device", "cuda", "--model", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.startswith("pagedllm: error: device: 'cuda'")
    assert "Traceback" not in result.stderr


def test_bad_flag_type_is_an_argparse_usage_error():
    result = run_cli("generate", "hi", "--max-tokens", "many")
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr


# ---- flags to SamplingParams / EngineConfig (in-process, no model) ------------------------
def test_flags_map_to_sampling_params_and_engine_kwargs():
    from pagedllm.cli import build_parser, engine_kwargs, sampling_params

    args = build_parser().parse_args([
        "generate", "p", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "5",
        "--min-p", "0.1", "--min-tokens", "2", "--stop", "a", "--stop", "bc",
        "--sampling-seed", "7", "--seed", "3", "--repetition-penalty", "1.2",
        "--presence-penalty", "0.5", "--frequency-penalty", "-0.5", "--ignore-eos",
        "--model", "m", "--dtype", "float32", "--block-size", "8", "--max-model-len", "64",
        "--attention-backend", "torch", "--scheduler", "fcfs"])
    p = sampling_params(args)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.5, 0.9, 5, 0.1)
    assert (p.max_tokens, p.min_tokens, p.stop_strings, p.seed) == (64, 2, ["a", "bc"], 7)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, -0.5)
    assert p.ignore_eos is True
    assert engine_kwargs(args) == {"model": "m", "dtype": "float32", "block_size": 8,
                                   "max_model_len": 64, "attention_backend": "torch",
                                   "scheduler": "fcfs", "seed": 3}


def test_unset_flags_keep_the_library_defaults():
    from pagedllm.cli import CHAT_MAX_TOKENS, build_parser, engine_kwargs, sampling_params
    from pagedllm.sampling_params import SamplingParams

    args = build_parser().parse_args(["chat"])
    assert engine_kwargs(args) == {}  # EngineConfig's defaults, model None = default model
    expected = SamplingParams(max_tokens=CHAT_MAX_TOKENS)
    assert sampling_params(args) == expected and expected.temperature == 1.0


class _ScriptedEngine:
    """Replays a request's text as the engine would report it, step by step."""

    def __init__(self, texts: list[str]):
        self.texts, self.aborted = texts, []

    def add_request(self, request_id, prompt, params):
        self.request_id = request_id

    def step(self):
        from pagedllm.outputs import CompletionOutput, RequestOutput

        text = self.texts.pop(0)
        done = not self.texts
        other = RequestOutput("other", None, [1], [CompletionOutput(0, "xx", [])], False)
        completion = CompletionOutput(0, text, [], finish_reason="stop" if done else None)
        mine = RequestOutput(self.request_id, None, [1], [completion], done)
        return [other, mine]

    def abort_request(self, request_id):
        self.aborted.append(request_id)


def test_streaming_never_prints_part_of_a_stop_string():
    """The engine trims "STOP" off once it is complete; the stream must not have shown "STO"."""
    import io

    from pagedllm.cli import stream_request
    from pagedllm.sampling_params import SamplingParams

    engine = _ScriptedEngine(["ab", "abST", "abSTO", "ab"])
    out = io.StringIO()
    text = stream_request(engine, "r", [1], SamplingParams(stop=["STOP"]), out)
    assert text == out.getvalue() == "ab"
    assert engine.aborted == []


# ---- generate and chat on the tiny model --------------------------------------------------
def test_chat_session_keeps_history_and_streams_the_whole_answer(tiny_model):
    import io

    from pagedllm.cli import ChatSession, chat_token_ids
    from pagedllm.llm import LLM
    from pagedllm.sampling_params import SamplingParams

    llm = LLM(str(tiny_model), num_kv_blocks=16, block_size=8, max_model_len=128)
    session = ChatSession(llm.engine, SamplingParams(max_tokens=3, ignore_eos=True), "be brief")
    out = io.StringIO()
    first = session.ask("hello", out)
    second = session.ask("one two", out)
    assert out.getvalue() == first + second
    assert [m["role"] for m in session.messages] == [
        "system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    # The second turn's prompt carries the first answer.
    first_turn = chat_token_ids(llm.get_tokenizer(), session.messages[:3])
    assert len(chat_token_ids(llm.get_tokenizer(), session.messages[:4])) > len(first_turn)
    assert llm.engine.kv_manager.stats().kv_blocks_free == 16  # nothing left holding blocks


def test_generate_prints_each_completion(tiny_model):
    result = run_cli("generate", "the quick brown fox", "one two three", "--model",
                     str(tiny_model), "--max-tokens", "6", "--ignore-eos", *TINY_ENGINE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert "pagedllm: model" in result.stderr  # engine logs go to stderr, not into answers
    assert "pagedllm:" not in result.stdout


def test_generate_json_lines(tiny_model):
    prompts = ["the quick brown fox", "hello , how are you"]
    result = run_cli("generate", *prompts, "--json", "--model", str(tiny_model),
                     "--max-tokens", "5", "--ignore-eos", "--temperature", "0", *TINY_ENGINE)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert len(r["token_ids"]) == 5
        assert r["finish_reason"] == "length"
        assert isinstance(r["text"], str)


def test_piped_chat_answers_each_line_with_history(tiny_model):
    result = run_cli("chat", "--model", str(tiny_model), "--max-tokens", "4", "--ignore-eos",
                     "--system", "you are a small model", *TINY_ENGINE,
                     stdin="what is the capital of france ?\n\n   \nand of paris ?\n")
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and all(a.strip() for a in answers)


def test_chat_exit_command_stops_reading(tiny_model):
    result = run_cli("chat", "--model", str(tiny_model), "--max-tokens", "3", "--ignore-eos",
                     *TINY_ENGINE, stdin="hello\n/exit\nnot answered\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_chat_over_the_context_exits_2(tiny_model):
    long_turn = " ".join(["one two three four five six seven eight nine ten"] * 20)
    result = run_cli("chat", "--model", str(tiny_model), *TINY_ENGINE, stdin=long_turn + "\n")
    assert result.returncode == 2
    assert "max_model_len" in result.stderr and "Traceback" not in result.stderr


def _read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 120) -> None:
    """Read a pty into ``seen`` until ``marker`` appears in what came after ``len(seen)``."""
    import os
    import select
    import time

    start, deadline = len(seen), time.monotonic() + timeout
    while marker not in seen[start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} on the terminal; got {bytes(seen)!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"terminal closed before {marker!r}; got {bytes(seen)!r}")
        seen += chunk


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_interactive_chat_on_a_terminal(tiny_model, tmp_path):
    """stdin a TTY: "> " prompts, an answer per turn, /exit quits with status 0."""
    import os
    import pty

    master, slave = pty.openpty()
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.cli", "chat", "--model", str(tiny_model),
             "--max-tokens", "3", "--ignore-eos", *TINY_ENGINE],
            stdin=slave, stdout=slave, stderr=stderr, close_fds=True)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"> ", seen)
        os.write(master, b"hello\n")
        _read_until(master, b"> ", seen)  # the answer, then the next prompt
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0, stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "/exit or Ctrl-D" in stderr_path.read_text()
    answer = bytes(seen).decode().split("hello", 1)[1].split("> ")[0]
    assert answer.strip()


# ---- the default model --------------------------------------------------------------------
@pytest.mark.slow
def test_chat_default_model_knows_the_capital_of_france():
    result = run_cli("chat", "--temperature", "0", stdin="What is the capital of France?\n",
                     timeout=900)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bench_latency_runs_on_dummy_weights_and_compares_with_hf(tiny_model):
    result = run_cli("bench", "latency", "--model", str(tiny_model), "--load-format", "dummy",
                     "--input-len", "8", "--output-len", "4", "--runs", "1", "--compare", "hf")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert "pagedllm" in rows and "HF" in rows
    # The host's share of a decode step: 3 decode steps after the first token.
    assert "host busy" in result.stdout and "of 3 steps" in result.stdout, result.stdout


def test_bench_kernels_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    result = run_cli("bench", "kernels")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
