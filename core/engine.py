"""LLMEngine: the step loop (schedule -> run -> sample -> update) over the plugins."""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.detokenizer import IncrementalDetokenizer
from pagedllm.kv_cache import KVCacheManager
from pagedllm.loader import load_checkpoint
from pagedllm.model_runner import PLACEHOLDER, ModelRunner
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.plugin_manager import get_registry, select
from pagedllm.request import Request, RequestGroup
from pagedllm.sampler import SampledBatch, Sampler
from pagedllm.sampling_params import InvalidRequestError, SamplingParams
from pagedllm.scheduler import SchedulerConfig


@dataclass
class _PendingStep:
    """A step whose tokens were sampled on the device but not yet read by the host."""

    batch: SampledBatch
    rows: dict[str, int]  # request id -> row of batch.token_ids
    indices: list[int]  # per row: where its token goes in the request's output_token_ids


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None) if tokenizer else None):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, log=None):
        self.config = config
        self.log = log or (lambda msg: print(f"pagedllm: {msg}", file=sys.stderr))
        registry = get_registry()
        self.device = config.resolve_device()
        # Unknown plugin names fail before anything heavy happens.
        sched_entry = registry.get("scheduler", config.scheduler)
        if config.attention_backend != "auto":
            registry.get("attention", config.attention_backend)

        ckpt = load_checkpoint(config.model, config.tokenizer, config.load_format)
        self.checkpoint = ckpt
        self.hf_config = ckpt.hf_config
        self.tokenizer = ckpt.tokenizer
        self.dtype = config.resolve_dtype(ckpt.checkpoint_dtype, self.device)
        archs = list(getattr(self.hf_config, "architectures", None) or [])
        model_cls = None
        for arch in archs:
            if arch in registry.entries["model"]:
                model_cls = registry.entries["model"][arch].cls
                break
        if model_cls is None:
            raise ValueError(
                f"model: architectures {archs} in {ckpt.path} are not supported; installed "
                f"model plugins: {', '.join(registry.names('model'))}"
            )
        head_dim = getattr(self.hf_config, "head_dim", None) or (
            self.hf_config.hidden_size // self.hf_config.num_attention_heads)
        attn_entry = select("attention", config.attention_backend, head_dim=head_dim,
                            dtype=self.dtype, device=self.device)
        self.attention_cls = attn_entry.cls
        self.model = model_cls(self.hf_config, self.attention_cls, self.dtype, self.device)
        if ckpt.format == "dummy":
            self._randomize_weights()
        else:
            self.model.load_weights(ckpt.weights())
        self.model.eval()

        self.num_layers = self.hf_config.num_hidden_layers
        self.num_kv_heads = getattr(self.hf_config, "num_key_value_heads", None) or \
            self.hf_config.num_attention_heads
        self.head_dim = head_dim

        model_len = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True):
            model_len = min(model_len, window)  # no sliding-window attention yet: stay inside it
        if config.max_model_len is not None:
            if config.max_model_len > model_len:
                raise ValueError(
                    f"max_model_len: {config.max_model_len} exceeds the model's context ({model_len})")
            model_len = config.max_model_len
        chunked = config.enable_chunked_prefill or getattr(sched_entry.cls, "chunked_prefill", False)
        max_batched = config.max_num_batched_tokens or (2048 if chunked else max(model_len, 2048))
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self._blocks_for_gpu_memory(max_batched, model_len)
        else:  # the memory budget, but no more than max_num_seqs full-length sequences need
            num_blocks = min(self._blocks_for_memory(config.kv_cache_memory_gb),
                             config.max_num_seqs * -(-model_len // config.block_size))
        num_swap = 0
        if config.preemption_mode == "swap":
            num_swap = self._blocks_for_memory(config.swap_space)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size,
                                         config.enable_prefix_caching, num_swap)
        shape = self.attention_cls.kv_cache_shape(num_blocks, config.block_size,
                                                  self.num_kv_heads, head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)]
        swap_shape = self.attention_cls.kv_cache_shape(num_swap, config.block_size,
                                                       self.num_kv_heads, head_dim)
        pin = self.device.type == "cuda"
        self.swap_caches = [torch.zeros(swap_shape, dtype=self.dtype, pin_memory=pin)
                            for _ in range(self.num_layers)] if num_swap else []
        capacity = num_blocks * config.block_size
        if model_len > capacity:
            self.log(f"max_model_len lowered from {model_len} to the KV capacity of {capacity} tokens")
            model_len = capacity
        self.max_model_len = model_len
        self.scheduler = sched_entry.cls(
            SchedulerConfig(config.max_num_seqs, max_batched, model_len, chunked,
                            config.preemption_mode),
            self.kv_manager,
        )
        graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and \
                self.attention_cls.cuda_graph_decode:
            from pagedllm.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(
                self.model, self.kv_caches, self.device, min(config.max_num_seqs, 512),
                model_len, config.block_size,
                context_buckets=self.attention_cls.cuda_graph_context_buckets)
            graphs.capture(self.log)
        self.runner = ModelRunner(self.model, self.kv_caches, self.kv_manager, self.device,
                                  model_len, graphs)
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None \
            else self.device.type == "cuda"
        self._pending: _PendingStep | None = None
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self.eos_token_ids = _eos_ids(self.hf_config, self.tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        self._requests: dict[str, RequestGroup] = {}
        self._arrivals = itertools.count()
        self.log(
            f"model {ckpt.path} ({archs[0]}, {ckpt.format}), dtype {str(self.dtype)[6:]}, "
            f"device {self.device}, attention {attn_entry.name}, scheduler {sched_entry.name}, "
            f"KV cache {num_blocks} blocks x {config.block_size} = {capacity} tokens, "
            f"max_model_len {model_len}, CUDA graphs {'on' if graphs else 'off'}, "
            f"async scheduling {'on' if self.async_scheduling else 'off'}"
        )

    @torch.no_grad()
    def _randomize_weights(self) -> None:
        gen = torch.Generator(self.device).manual_seed(self.config.seed)
        for name, p in self.model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=self.device) * 0.02)

    def _block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.config.block_size * self.num_kv_heads * self.head_dim \
            * itemsize

    @torch.inference_mode()
    def _blocks_for_gpu_memory(self, max_batched: int, model_len: int) -> int:
        """KV blocks that fit in ``gpu_memory_utilization`` of the device after the weights
        and the peak activations of a profiling run at the largest batch."""
        from pagedllm.attention import AttentionMetadata
        from pagedllm.memory_sizing import kv_cache_blocks, profile_lengths

        bs = self.config.block_size
        lens = profile_lengths(max_batched, self.config.max_num_seqs, model_len)
        blocks_per = [-(-n // bs) for n in lens]
        shape = self.attention_cls.kv_cache_shape(sum(blocks_per), bs, self.num_kv_heads,
                                                  self.head_dim)
        temp = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(self.num_layers)]
        temp_bytes = sum(t.numel() * t.element_size() for t in temp)
        tables = torch.zeros((len(lens), max(blocks_per)), dtype=torch.int32)
        first = 0
        slots = []
        for i, (n, nb) in enumerate(zip(lens, blocks_per)):
            tables[i, :nb] = torch.arange(first, first + nb)
            slots.append(torch.arange(first * bs, first * bs + n))
            first += nb
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_start_loc=torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32,
                                         device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev), max_query_len=max(lens), max_seq_len=max(lens),
            query_lens_host=list(lens), seq_lens_host=list(lens))
        total_tokens = sum(lens)
        ids = torch.zeros(total_tokens, dtype=torch.long, device=dev)
        pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        hidden = self.model(ids, pos, temp, md)
        rows = min(self.config.max_num_seqs, total_tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - temp_bytes
        del temp, hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        others = total - free - torch.cuda.memory_reserved(dev)  # other processes, CUDA context
        blocks = kv_cache_blocks(total, others, peak, self.config.gpu_memory_utilization,
                                 self._block_bytes())
        self.log(f"profiling run: {peak / 2**30:.2f} GiB peak for weights and activations at "
                 f"{total_tokens} tokens; KV cache gets {blocks * self._block_bytes() / 2**30:.2f} GiB")
        return blocks

    def _blocks_for_memory(self, gigabytes: float) -> int:
        return max(1, int(gigabytes * (1 << 30)) // self._block_bytes())

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError(
                "prompt", "this model has no tokenizer; pass {'prompt_token_ids': [...]}")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def make_request(self, request_id: str, prompt: str | dict | list[int],
                     params: SamplingParams, priority: int = 0) -> Request:
        """Validate and build a request without touching engine state."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", "must be a SamplingParams")
        params.validate()
        text = None
        if isinstance(prompt, str):
            text = prompt
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            token_ids = self.tokenize(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
            text = prompt.get("prompt")
        elif isinstance(prompt, dict) and "prompt" in prompt:
            return self.make_request(request_id, prompt["prompt"], params, priority)
        else:
            raise InvalidRequestError(
                "prompt", "must be a string or a dict with 'prompt_token_ids' or 'prompt'")
        if not token_ids:
            raise InvalidRequestError("prompt", "must not be empty (0 tokens)")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids", f"token id {bad[0]!r} is outside [0, {self.vocab_size})")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {n} tokens; the context (max_model_len) is {self.max_model_len} "
                f"tokens and at least one must be left to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})")
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        eos = None if params.ignore_eos else next(iter(sorted(self.eos_token_ids)), None)
        req = Request(request_id, text, token_ids, params, eos, next(self._arrivals), priority)
        req.max_tokens = max_tokens
        if params.seed is not None:
            req.generator = torch.Generator(self.device).manual_seed(params.seed)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids,
                                                     params.skip_special_tokens)
        req.group = RequestGroup(request_id, [req])
        return req

    def submit(self, req: Request) -> None:
        """Queue a request made by ``make_request``."""
        self._requests[req.request_id] = req.group
        self.scheduler.add_request(req)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> Request:
        req = self.make_request(request_id, prompt, params or SamplingParams(), priority)
        self.submit(req)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self._requests.pop(request_id, None)
        if group is None:
            return None
        now = time.monotonic()
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.abort_request(seq.request_id)
                seq.metrics.finished_time = now
            _drop_pending(seq)
        return self._output(group)

    def release(self, request: Request) -> None:
        """Free the blocks a finished ``hold_blocks`` request kept."""
        self.kv_manager.free(request.request_id)

    def _fork(self, parent: Request) -> list[Request]:
        """Split a request whose prompt was just computed into ``num_sequences`` sequences
        sharing the prompt's blocks (copy-on-write)."""
        children = []
        for i in range(1, parent.params.num_sequences):
            child = Request(f"{parent.request_id}#{i}", parent.prompt, parent.prompt_token_ids,
                            parent.params, parent.eos_token_id, parent.arrival_index,
                            parent.priority, max_tokens=parent.max_tokens,
                            num_computed_tokens=parent.num_computed_tokens,
                            cache_key=parent.cache_key, group=parent.group, index=i)
            child.metrics = parent.metrics
            if parent.params.seed is not None:
                child.generator = torch.Generator(self.device).manual_seed(parent.params.seed + i)
            if parent.detokenizer is not None:
                child.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, parent.prompt_token_ids, parent.params.skip_special_tokens)
            self.kv_manager.fork(parent.request_id, child.request_id)
            self.scheduler.add_forked(child)
            parent.group.seqs.append(child)
            children.append(child)
        return children

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    # ---- the step -------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that got a token (with
        ``final_only``, of those that finished: an offline caller wants nothing else).

        With async scheduling the step's tokens stay on the device: the next ``step`` queues
        its own batch first (its inputs take those tokens on the device), then reads them
        while that batch runs, so outputs come one step late.  Each sampled request holds a
        ``PLACEHOLDER`` output token meanwhile; one that will stop on length whatever the
        token is finished at once, so it is never scheduled past its end.
        """
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if self._pending is not None:
                return self._resolve(final_only)
            if self.scheduler.has_unfinished() and not sched.preempted:
                raise RuntimeError("scheduler made no progress with requests pending")
            return []
        now = time.monotonic()
        self._execute_block_ops()
        pending = self._pending
        model_input = self.runner.prepare(
            sched, pending.rows if pending else None,
            pending.batch.token_ids if pending else None)
        self.sampler.copy_done()  # the model may overwrite the ids it copies (a graph's)
        logits, greedy_ids = self.runner.execute(model_input)
        # The loops below run for every request on every step, ahead of the device: they
        # read attributes once into locals and call out only for what is rare.
        caching = self.kv_manager.enable_prefix_caching
        cached_keys = self.kv_manager.num_cached_blocks
        bs = self.kv_manager.block_size
        for item in sched.scheduled:
            req = item.request
            computed = req.num_computed_tokens = req.num_computed_tokens + item.num_new_tokens
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if caching:
                # Full blocks whose tokens are all known (not awaiting the device) are
                # registered for prefix caching, once each.
                known = min(computed, req.num_tokens - req.num_pending)
                if known // bs > cached_keys(req.request_id) and not req.is_finished:
                    self.kv_manager.cache_full_blocks(req.request_id, req.all_token_ids, known,
                                                      req.cache_key)
        outputs = self._resolve(final_only) if pending is not None else []
        requests, rows = [], []
        same_rows = True  # the logits' rows are the requests' rows, one each
        for row, req in enumerate(model_input.sample_requests):
            if req.is_finished:  # it stopped on the token just resolved
                same_rows = False
                continue
            requests.append(req)
            rows.append(row)
            if req.params.num_sequences > 1 and req.group.needs_fork():
                for child in self._fork(req):
                    same_rows = False
                    requests.append(child)
                    rows.append(row)
        if not requests:
            return outputs
        if not same_rows:
            index = torch.tensor(rows, device=logits.device)
            logits = logits[index]
            greedy_ids = greedy_ids[index] if greedy_ids is not None else None
        batch = self.sampler.sample(logits, requests, greedy_ids)
        indices = []
        max_len = self.max_model_len
        for req in requests:
            out = req.output_token_ids
            indices.append(len(out))
            out.append(PLACEHOLDER)
            req.num_pending += 1
            if len(out) >= req.max_tokens or req.num_tokens >= max_len:
                self.scheduler.finish(req, "length")
        self._pending = _PendingStep(batch, {r.request_id: i for i, r in enumerate(requests)},
                                     indices)
        if not self.async_scheduling:
            outputs += self._resolve(final_only)
        return outputs

    def _resolve(self, final_only: bool = False) -> list[RequestOutput]:
        """Read the pending step's tokens and apply them: stops, text, outputs."""
        pending, self._pending = self._pending, None
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        sampled = self.sampler.to_host(pending.batch, decode)
        now = time.monotonic()
        touched: dict[str, RequestGroup] = {}
        for req, index, tok in zip(pending.batch.requests, pending.indices, sampled):
            out = req.output_token_ids
            if index >= len(out) or out[index] != PLACEHOLDER:
                continue  # aborted (or stopped) since: its placeholders were dropped
            out[index] = tok.token_id
            req.num_pending -= 1
            self._append_token(req, tok, now, index + 1)
            touched[req.group.request_id] = req.group
        outputs = []
        for gid, group in touched.items():
            finished = group.is_finished
            if finished or not final_only:
                outputs.append(self._output(group))
            if finished:
                self._requests.pop(gid, None)
        return outputs

    def _execute_block_ops(self) -> None:
        """Swap-outs, swap-ins and copy-on-write copies the scheduler asked for."""
        ops = self.kv_manager.take_pending()
        if not ops:
            return
        dim = self.attention_cls.block_dim
        dev = self.device

        def index(pairs, side):
            return torch.tensor([p[side] for p in pairs], dtype=torch.long)

        for cache, swap in zip(self.kv_caches, self.swap_caches or [None] * len(self.kv_caches)):
            if ops.swap_out:
                src, dst = index(ops.swap_out, 0).to(dev), index(ops.swap_out, 1)
                swap.index_copy_(dim, dst, cache.index_select(dim, src).to("cpu"))
            if ops.swap_in:
                src, dst = index(ops.swap_in, 0), index(ops.swap_in, 1).to(dev)
                cache.index_copy_(dim, dst, swap.index_select(dim, src).to(dev))
            if ops.copy:
                src, dst = index(ops.copy, 0).to(dev), index(ops.copy, 1).to(dev)
                cache.index_copy_(dim, dst, cache.index_select(dim, src))

    def _append_token(self, req: Request, tok, now: float, num_out: int) -> None:
        """Account for output token number ``num_out`` (already in ``output_token_ids``)."""
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if tok.logprob is not None:
            req.cumulative_logprob += tok.logprob
            if req.logprobs is not None:
                req.logprobs.append(tok.top_logprobs)
        delta = req.detokenizer.add_token(tok.token_id) if req.detokenizer else ""
        req.output_text += delta
        reason, stop = self._stop_check(req, tok.token_id, delta, num_out)
        if reason is None:
            return
        req.stop_reason = stop
        req.metrics.finished_time = now
        if req.is_finished:  # finished ahead on length; a stop on its last token wins
            req.finish_reason = reason
        else:
            self.scheduler.finish(req, reason)
        _drop_pending(req)

    def _stop_check(self, req: Request, token: int, delta: str,
                    n_out: int) -> tuple[str | None, Any]:
        p = req.params
        if n_out >= p.min_tokens:
            if req.eos_token_id is not None and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
            if p.stop_strings and delta:
                text = req.output_text
                window = len(delta) + max(len(s) for s in p.stop_strings) - 1
                begin = max(0, len(text) - window)
                hits = [(text.find(s, begin), s) for s in p.stop_strings]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    req.output_text = text[: i + len(s)] if p.include_stop_str_in_output else text[:i]
                    return "stop", s
        if n_out >= req.max_tokens or req.num_prompt_tokens + n_out >= self.max_model_len:
            return "length", None
        return None, None

    def _output(self, group: RequestGroup) -> RequestOutput:
        first = group.first
        params = first.params
        seqs = list(group.seqs)
        finished = group.is_finished
        if finished and params.num_sequences > params.n:  # best_of: keep the n most likely
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
        completions = [
            CompletionOutput(
                index=i,
                text=s.output_text,
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.needs_logprob else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(seqs)
        ]
        return RequestOutput(group.request_id, first.prompt, first.prompt_token_ids, completions,
                             finished, first.metrics)

    def stats(self) -> dict[str, Any]:
        s = asdict(self.kv_manager.stats())
        s["num_preemptions"] = self.scheduler.num_preemptions
        s["num_swapped_out"] = getattr(self.scheduler, "num_swapped_out", 0)
        s["num_swapped_in"] = getattr(self.scheduler, "num_swapped_in", 0)
        s["num_running"] = self.scheduler.num_running
        s["num_waiting"] = self.scheduler.num_waiting
        s["num_tokens_computed"] = self.runner.num_tokens_computed
        return s


def _drop_pending(req: Request) -> None:
    """Forget tokens the request will never get (it stopped or was aborted before them)."""
    while req.num_pending and req.output_token_ids and \
            req.output_token_ids[-1] == PLACEHOLDER:
        req.output_token_ids.pop()
        req.num_pending -= 1
    req.num_pending = 0
