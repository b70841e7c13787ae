"""The ``pagedllm`` command line, after vLLM's: ``generate``, ``chat``, ``serve``,
``bench serve | throughput | latency | kernels`` and ``plugins``.

    pagedllm generate "The capital of France is" --max-tokens 8
    echo "What is the capital of France?" | pagedllm chat --temperature 0
    pagedllm serve --model DIR --host 127.0.0.1 --port 8000 --api-key KEY
    pagedllm bench serve --base-url http://127.0.0.1:8000 --rate 1 4 inf --num-requests 1000
    pagedllm plugins --json

Answers go to stdout and nothing else does; engine logs, progress bars and errors go to
stderr, so output can be piped.  A user error (bad model path, unknown plugin, out-of-range
sampling value: pagedllm raises ``ValueError`` subclasses for all of them) prints
``pagedllm: error: <message>`` and exits with status 2, as argparse does for bad flags.

Flag names are the ``EngineConfig`` and ``SamplingParams`` field names with dashes, and flags
left out keep those classes' defaults, so the CLI and the Python API behave the same.  One
exception: ``--seed`` is the engine's seed (vLLM's meaning), and the per-request
``SamplingParams.seed`` is ``--sampling-seed``.  ``--max-tokens`` defaults to 64 for
``generate`` and 256 for ``chat`` rather than SamplingParams' 16, which is too short to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from pagedllm import __version__
from pagedllm.config import EngineConfig
from pagedllm.sampling_params import SamplingParams

PROG = "pagedllm"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
GENERATE_MAX_TOKENS = 64
CHAT_MAX_TOKENS = 256
EXIT_COMMANDS = ("/exit", "/quit")

# SamplingParams fields whose flag is not simply the field name (``--seed`` is the engine's).
_SAMPLING_DEST = {"seed": "sampling_seed"}
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
_SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.init}


# ---- arguments ----------------------------------------------------------------------------
def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags; every default is None so EngineConfig's own default applies."""
    d = _ENGINE_DEFAULTS
    g = parser.add_argument_group("engine")
    g.add_argument("--model", metavar="DIR_OR_GGUF",
                   help="HF checkpoint directory or .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct, fetched into the cache on first use)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, if not the model's")
    g.add_argument("--load-format", choices=["auto", "dummy"],
                   help="dummy: random weights for --model given as a preset shape "
                        "(qwen3-0.6b, llama-3.1-8b) or a config.json, for benchmarks "
                        f"(default: {d['load_format']})")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help=f"weight and activation dtype (default: {d['dtype']})")
    g.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default: {d['device']})")
    g.add_argument("--attention-backend", metavar="NAME",
                   help=f"attention plugin; see `pagedllm plugins` (default: "
                        f"{d['attention_backend']})")
    g.add_argument("--scheduler", metavar="NAME",
                   help=f"scheduler plugin (default: {d['scheduler']})")
    g.add_argument("--block-size", type=int, metavar="N",
                   help=f"tokens per KV cache block (default: {d['block_size']})")
    g.add_argument("--num-kv-blocks", type=int, metavar="N",
                   help="KV cache blocks (default: sized from --kv-cache-memory-gb)")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help=f"CUDA: share of the device for weights, activations and KV cache "
                        f"(default: {d['gpu_memory_utilization']})")
    g.add_argument("--kv-cache-memory-gb", type=float, metavar="GB",
                   help=f"KV cache budget (default: {d['kv_cache_memory_gb']})")
    g.add_argument("--max-model-len", type=int, metavar="N",
                   help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, metavar="N",
                   help=f"sequences per step (default: {d['max_num_seqs']})")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                   help="tokens per step (default: max(max-model-len, 2048))")
    g.add_argument("--enable-chunked-prefill", action="store_true", default=None,
                   help="split long prompts across steps")
    g.add_argument("--seed", type=int, metavar="N",
                   help=f"engine random seed (default: {d['seed']})")
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA: run every step eagerly, no CUDA graphs for decode")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare step n+1 while the device runs step n (default: on for CUDA)")


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Sampling flags; defaults are None (SamplingParams' default) except --max-tokens."""
    d = _SAMPLING_DEFAULTS
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, metavar="T",
                   help=f"0 = greedy (default: {d['temperature']})")
    g.add_argument("--top-p", type=float, metavar="P", help=f"(default: {d['top_p']}, off)")
    g.add_argument("--top-k", type=int, metavar="K", help=f"(default: {d['top_k']}, off)")
    g.add_argument("--min-p", type=float, metavar="P", help=f"(default: {d['min_p']}, off)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--min-tokens", type=int, metavar="N",
                   help=f"fewest tokens before EOS or a stop string counts (default: "
                        f"{d['min_tokens']})")
    g.add_argument("--stop", action="append", metavar="STRING",
                   help="stop before this string; repeat for several")
    g.add_argument("--sampling-seed", type=int, metavar="N",
                   help="per-request seed (SamplingParams.seed; default: the engine's RNG)")
    g.add_argument("--repetition-penalty", type=float, metavar="X",
                   help=f"(default: {d['repetition_penalty']}, off)")
    g.add_argument("--presence-penalty", type=float, metavar="X",
                   help=f"(default: {d['presence_penalty']}, off)")
    g.add_argument("--frequency-penalty", type=float, metavar="X",
                   help=f"(default: {d['frequency_penalty']}, off)")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past the end-of-sequence token")


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    """HTTP server flags, with vLLM's names."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: "
                        "%(default)s)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and "
                        "/detokenize (default: $PAGEDLLM_API_KEY, else no key)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="names clients give as `model` (default: the model path's basename, "
                        "or SmolLM2-135M-Instruct for the default model)")
    g.add_argument("--max-waiting", type=int, metavar="N",
                   help="answer 503 with Retry-After once N requests are waiting to run, so "
                        "memory stays bounded under overload (default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, let running requests finish for up to S seconds, then "
                        "abort them (default: %(default)s)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="(default: %(default)s)")
    g.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no log line per HTTP request")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; subcommands carry their handler in ``args.handler``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="pagedllm: LLM inference with a paged KV cache and plugins.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts",
                         description="Complete each prompt and print the completion.")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--json", action="store_true",
                     help="one JSON object per prompt and line: prompt, text, token_ids, "
                          "finish_reason")
    _add_engine_args(gen)
    _add_sampling_args(gen, GENERATE_MAX_TOKENS)
    gen.set_defaults(handler=cmd_generate)

    chat = sub.add_parser(
        "chat", help="chat with the model",
        description="Chat through the tokenizer's chat template.  On a terminal: an "
                    "interactive prompt (/exit or Ctrl-D quits).  Otherwise: one user turn per "
                    "line of stdin, one answer per turn, with the history kept across lines.")
    chat.add_argument("--system", metavar="TEXT", help="system message opening the conversation")
    _add_engine_args(chat)
    _add_sampling_args(chat, CHAT_MAX_TOKENS)
    chat.set_defaults(handler=cmd_chat)

    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve the model over OpenAI's HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, "
                    "/detokenize) until SIGTERM or Ctrl-C, which stop accepting requests and "
                    "let the running ones finish (up to --shutdown-timeout).")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="the model, as vLLM's `vllm serve MODEL` takes it (same as --model)")
    _add_server_args(serve)
    _add_engine_args(serve)
    serve.set_defaults(handler=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks",
                           description="Benchmarks; `bench serve` load-tests a running server.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    from pagedllm.bench import serve as bench_serve  # standard library only: cheap

    bench_serve_parser = bench_sub.add_parser(
        "serve", help="W3: streaming requests with Poisson arrivals against a server",
        description="Send W3 of BENCHMARKS.md over HTTP: streaming completions with "
                    "Poisson arrivals at each --rate, random-token prompts, ignore_eos; print "
                    "request throughput, output tok/s, TTFT and TPOT at p50 and p99.")
    bench_serve.add_arguments(bench_serve_parser)
    bench_serve_parser.set_defaults(handler=cmd_bench_serve)
    from pagedllm.bench import latency as bench_latency
    from pagedllm.bench import throughput as bench_throughput

    for name, module, help_text in (
            ("throughput", bench_throughput, "W1: offline throughput, against HF and the floor"),
            ("latency", bench_latency, "W2: single-stream TTFT and TPOT, against HF and the floor")):
        p = bench_sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_args(p)
        p.set_defaults(handler=lambda a, m=module: m.run(a) or EXIT_OK)
    kernels = bench_sub.add_parser(
        "kernels", help="W6: attention backends on paged decode shapes (CUDA only)",
        description="Arguments after `kernels` go to `python -m pagedllm.bench.kernels`.",
        add_help=False)
    kernels.add_argument("kernel_args", nargs=argparse.REMAINDER)
    kernels.set_defaults(handler=cmd_bench_kernels)

    plugins = sub.add_parser("plugins", help="list installed plugins",
                             description="List every plugin class the installed plugins "
                                         "register (no model is loaded).")
    plugins.add_argument("--json", action="store_true", help="print a JSON array")
    plugins.set_defaults(handler=cmd_plugins)
    return parser


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM``/``EngineConfig`` keyword arguments for the engine flags that were given."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if getattr(args, f.name, None) is not None}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the sampling flags; raises InvalidRequestError for bad values
    (before any model loads, so a typo costs nothing)."""
    kwargs = {}
    for name in _SAMPLING_DEFAULTS:
        value = getattr(args, _SAMPLING_DEST.get(name, name), None)
        if value is not None:
            kwargs[name] = value
    return SamplingParams(**kwargs)


def _load_llm(args: argparse.Namespace):
    """Import lazily: ``plugins`` and ``--help`` must not pay for the engine."""
    from pagedllm.llm import LLM

    return LLM(**engine_kwargs(args))


# ---- generate -----------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """Run all prompts as one batch (continuous batching does the rest), print in order."""
    params = sampling_params(args)
    llm = _load_llm(args)
    outputs = llm.generate(args.prompts, params, use_tqdm=sys.stderr.isatty())
    for prompt, out in zip(args.prompts, outputs):
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text,
                              "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}, ensure_ascii=False))
        else:
            print(completion.text)
    return EXIT_OK


# ---- chat ---------------------------------------------------------------------------------
def chat_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation plus the assistant's opening; transformers 5 returns a
    BatchEncoding from ``apply_chat_template(tokenize=True)``, older versions a list."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return list(encoded)


def stream_request(engine, request_id: str, prompt_token_ids: list[int],
                   params: SamplingParams, out: TextIO) -> str:
    """Run one request on the engine, writing its text to ``out`` as tokens arrive; return
    the final text.

    The engine cuts a stop string (and what follows) off the text once it has all of it, so
    until the request finishes the last ``len(longest stop) - 1`` characters are held back:
    they may be the start of a stop string, and what is written cannot be taken back.
    """
    holdback = 0
    if params.stop_strings and not params.include_stop_str_in_output:
        holdback = max(len(s) for s in params.stop_strings) - 1
    engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)
    shown, text, finished = 0, "", False
    try:
        while not finished:
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text, finished = output.outputs[0].text, output.finished
                end = len(text) if finished else len(text) - holdback
                if end > shown:
                    out.write(text[shown:end])
                    out.flush()
                    shown = end
    finally:
        if not finished:  # Ctrl-C or an error mid-answer: give the KV blocks back
            engine.abort_request(request_id)
    return text


class ChatSession:
    """A conversation with the engine: the message history and the per-turn request."""

    def __init__(self, engine, params: SamplingParams, system: str | None = None):
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat: the model has no tokenizer; use --tokenizer DIR")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat: the tokenizer has no chat template (not an instruct model?); "
                "use `pagedllm generate` for plain completion")
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self._turns = 0

    def _params_for(self, prompt_len: int) -> SamplingParams:
        """Cap max_tokens at the context left, so a long chat ends answers early (finish
        reason "length") instead of failing; a prompt over the context still fails."""
        room = self.engine.max_model_len - prompt_len
        if self.params.max_tokens is not None and 0 < room < self.params.max_tokens:
            return dataclasses.replace(self.params, max_tokens=room)
        return self.params

    def ask(self, user_text: str, out: TextIO) -> str:
        """Add a user turn, stream the answer to ``out``, keep it in the history.  If the
        turn fails or is interrupted, the history is left as it was before it."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = chat_token_ids(self.tokenizer, self.messages)
            self._turns += 1
            answer = stream_request(self.engine, f"chat-{self._turns}", ids,
                                    self._params_for(len(ids)), out)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def _chat_interactive(session: ChatSession) -> int:
    """The terminal loop: ``> `` prompt, streamed answers; a failed turn does not end it."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"{PROG} chat: type a message; /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return EXIT_OK
        if not line:
            continue
        if line in EXIT_COMMANDS:
            return EXIT_OK
        try:
            session.ask(line, sys.stdout)
        except KeyboardInterrupt:
            pass  # Ctrl-C stops this answer, not the chat
        except ValueError as exc:  # e.g. the conversation outgrew the context
            _print_error(exc)
            continue
        print(flush=True)


def _chat_piped(session: ChatSession, lines: TextIO) -> int:
    """One user turn per non-blank line; an error ends the run (exit 2) so scripts see it."""
    for line in iter(lines.readline, ""):  # readline, not iteration: no read-ahead stalls
        line = line.strip()
        if not line:
            continue
        if line in EXIT_COMMANDS:
            break
        session.ask(line, sys.stdout)
        print(flush=True)
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive on a terminal, line by line otherwise."""
    params = sampling_params(args)
    llm = _load_llm(args)
    session = ChatSession(llm.engine, params, args.system)
    if sys.stdin.isatty():
        return _chat_interactive(session)
    return _chat_piped(session, sys.stdin)


# ---- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM or Ctrl-C (then drain and exit 0)."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice, as {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if not 0 <= args.port <= 65535:
        raise ValueError(f"port: must be in [0, 65535], got {args.port}")
    if args.max_waiting is not None and args.max_waiting < 1:
        raise ValueError(f"max-waiting: must be >= 1, got {args.max_waiting}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"shutdown-timeout: must be >= 0, got {args.shutdown_timeout}")
    from pagedllm.server.launcher import run_server

    return run_server(
        engine_kwargs(args), host=args.host, port=args.port,
        served_model_names=args.served_model_name,
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """W3 against a running server; one table row (or JSON line) per rate."""
    import asyncio

    from pagedllm.bench import serve as bench_serve

    bench_serve.check_arguments(args)
    summaries = asyncio.run(bench_serve.bench(args))
    return EXIT_OK if all(s.completed for s in summaries) else EXIT_FAILURE


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from pagedllm.bench import kernels

    return kernels.main(args.kernel_args) or EXIT_OK


# ---- plugins ------------------------------------------------------------------------------
PLUGIN_COLUMNS = ("kind", "name", "plugin", "package")


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the registry: loads plugin modules (which is how they register) but no model."""
    from pagedllm.plugin_manager import get_registry

    rows = [{col: getattr(entry, col) for col in PLUGIN_COLUMNS}
            for entry in get_registry().all()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in PLUGIN_COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in PLUGIN_COLUMNS).rstrip())
    print("  ".join("-" * widths[c] for c in PLUGIN_COLUMNS))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in PLUGIN_COLUMNS).rstrip())
    return EXIT_OK


# ---- entry point --------------------------------------------------------------------------
def _print_error(exc: BaseException | str) -> None:
    print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn user errors into one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:  # pagedllm's user errors: bad path, plugin, sampling value, ...
        _print_error(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`pagedllm generate ... | head -1`): stop quietly, and keep
        # Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
