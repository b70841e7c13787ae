"""The hook specifications: the whole contract between the core and its plugins.

Every technique in pagedllm is a plugin.  A plugin is a module (or object) with functions
marked ``@hookimpl`` whose names match the specs below.  The core calls each hook once,
when the plugin registry is first built (``pagedllm.plugin_manager.get_registry``), and never
again in the hot path: hooks *register classes*; the engine instantiates them.

Each registered class carries a ``name`` (what users select with, e.g.
``attention_backend="torch"``) and a ``priority`` (what ``"auto"`` ranks by among the
classes whose ``supports(...)`` says yes).  The abstract base classes named in each
docstring live in the core and list the few methods the core calls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # imports for annotations only; keep plugin import cheap
    from torch import nn

    from pagedllm.attention import AttentionBackend
    from pagedllm.quantization import QuantizationMethod
    from pagedllm.scheduler import Scheduler
    from pagedllm.speculative import SpeculativeDrafter

PROJECT_NAME = "pagedllm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_attention_backends() -> list[type[AttentionBackend]]:
    """Return attention backend classes, subclasses of ``pagedllm.attention.AttentionBackend``.

    Called once, when the registry is built.  Each class must set ``name`` (unique among
    backends) and ``priority`` (higher wins under ``attention_backend="auto"``), and implement:

    - ``supports(head_dim, dtype, device) -> bool`` (classmethod): whether it can run here;
      ``"auto"`` only considers backends that say yes.
    - ``kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim) -> tuple`` (static):
      the layout of one layer's KV cache tensor.  The core allocates exactly one such tensor
      per layer and never looks inside it, except through ``block_dim`` (the axis that indexes
      blocks) when it copies or swaps whole blocks.
    - ``forward(query, key, value, kv_cache, metadata) -> Tensor``: write this step's new
      ``key``/``value`` into ``kv_cache`` at ``metadata.slot_mapping``, then attend each
      sequence's queries to its cached keys/values, reading them only through
      ``metadata.block_tables``.  The batch is flat and unpadded: prefill chunks and decode
      tokens of many sequences mixed in one call (see ``AttentionMetadata``).
    - ``cuda_graph_decode`` (class attribute, default False): True promises that, for a
      batch where every row has one query token, ``forward`` launches the same work whatever
      the device tensors of ``metadata`` hold, reading the host lists only for their length
      and ``max_seq_len``: no host syncs, no allocations sized from data.  The engine then
      captures decode steps in CUDA graphs with the metadata's tensors as static buffers,
      padded rows carrying ``seq_lens`` 1, block 0 first in their table row and
      ``slot_mapping`` -1 (write nothing), and replays them with only the tensors' contents
      changed.  A graph batch's block-table rows are wider than any table; entries past the
      step's widest table are unspecified, so a row is read only up to its sequence's length.
    - ``cuda_graph_context_buckets(batch_size) -> tuple[int, ...]`` (classmethod, optional;
      the base class says none): shorter context lengths for which the engine also
      captures decode graphs of that batch size.  The graph for length L declares
      ``max_seq_len`` L (and ``seq_lens_host`` [L] * batch), so ``forward`` may launch work
      sized for sequences of at most L tokens; the engine replays it only for batches whose
      longest sequence (this step's token included) fits, else the model-length graph.  A
      backend whose best decode work differs for short contexts (the ``triton`` backend's
      per-head kernel) names them here.
    - ``fuses_rotary(metadata) -> bool`` (optional; the base class says False): True for a
      step means the model hands ``forward`` q and k *before* the rotary embedding, plus
      ``rotary=RotaryInputs(...)`` (the step's cos/sin rows and Qwen3's q/k norms), and
      ``forward`` must apply them exactly as ``RotaryInputs`` defines, to the queries and to
      the keys it caches.  It lets a backend fold the rotation into its own kernels (the
      ``triton`` backend does at decode: one launch a layer fewer).  The answer may depend
      on the step's layout but, under ``cuda_graph_decode``, not on the device tensors.
    - ``rotary_by_position`` (class attribute, default False): True lets the model pass
      ``RotaryInputs(by_position=True)`` in ``fuses_rotary`` steps: whole cos/sin tables
      over positions, token t's row being its position ``seq_lens[t] - 1``, instead of the
      step's rows (one gather kernel a step fewer).  Such a backend's ``fuses_rotary``
      says True only for decode steps (one query token a row), where that holds.

    - ``forward_partials(query, key, value, kv_cache, metadata, rotary=None)`` (optional;
      the base class returns None): for a decode-only step (one query token a row), the
      work of ``forward`` (the step's K/V written, rotary applied as there) but the output
      left as ``AttentionPartials``, which the model's o_proj combines as it reads them
      (``fused_ops.combine_linear``): a backend that splits long contexts into partitions
      then needs no combine of its own.  None means not for this step, and nothing ran;
      under ``cuda_graph_decode`` the answer may not depend on the device tensors.

    Every backend must pass ``tests/test_attention_conformance.py`` against the ``torch``
    reference backend.
    """


@hookspec
def register_schedulers() -> list[type[Scheduler]]:
    """Return scheduler policy classes, subclasses of ``pagedllm.scheduler.Scheduler``.

    Called once, when the registry is built.  Each class sets ``name``; the user selects one
    with ``scheduler="<name>"``.  The engine constructs it as
    ``cls(config: SchedulerConfig, kv_cache: KVCacheManager)`` and calls ``add_request``,
    ``abort_request``, ``has_unfinished``, then every step ``schedule() -> SchedulerOutput``
    (which requests run how many new tokens, which were preempted; block copies and swaps it
    asked the KV manager for are executed by the engine before the step runs), and
    ``finish(request, reason)`` when a request stops, which must free its blocks at once.
    ``add_forked`` adds a sequence forked (copy-on-write) from a running one.
    The core's ``ContinuousBatchingScheduler`` implements the mechanism; a policy usually only
    overrides ``order_key(request)`` (who goes first, and who is preempted first: the last).
    A class that sets ``chunked_prefill = True`` always splits prompts: the engine builds its
    ``SchedulerConfig`` with chunked prefill on (and a 2048-token default budget).
    """


@hookspec
def register_quantization_methods() -> list[type[QuantizationMethod]]:
    """Return quantization method classes, subclasses of
    ``pagedllm.quantization.QuantizationMethod``.

    Called once, when the registry is built.  Each class sets ``name``; it is selected with
    ``quantization="<name>"`` or by the checkpoint's ``quantization_config.quant_method``.
    Contract for the loader: it will call ``method.quantize_model(model)`` after the weights
    are loaded, and the method replaces the ``nn.Linear`` layers it handles with its own
    modules, which must compute the same function as the dequantized layer within the
    method's stated error.  (No built-in method yet and the engine does not call this hook
    yet: GGUF files are dequantized at load.)
    """


@hookspec
def register_speculative_drafters() -> list[type[SpeculativeDrafter]]:
    """Return speculative drafter classes, subclasses of
    ``pagedllm.speculative.SpeculativeDrafter``.

    Called once, when the registry is built.  Each class sets ``name``, selected with
    ``speculative_method="<name>"``.  A drafter's ``propose(token_ids, k) -> list[int]``
    proposes up to ``k`` next tokens for one sequence given all its tokens so far; the engine
    verifies the proposals with one target-model step, so a drafter affects speed, never output.
    (Contract only: no built-in drafter yet and the engine does not call this hook yet.)
    """


@hookspec
def register_model_architectures() -> dict[str, type[nn.Module]]:
    """Return ``{HF architecture name: model class}``, e.g. ``{"LlamaForCausalLM": Llama}``.

    Called once, when the registry is built.  The key is matched against ``architectures``
    in the checkpoint's config.json.  The engine constructs the class as
    ``cls(hf_config, attention: AttentionFactory, dtype, device)`` and calls:

    - ``load_weights(weights: Iterable[tuple[str, Tensor]])`` with HF parameter names;
    - ``forward(input_ids, positions, kv_caches, metadata) -> hidden_states`` on one flat
      token batch (``input_ids`` and ``positions`` are 1-D, one entry per scheduled token);
    - ``compute_logits(hidden_states) -> logits`` on the rows to be sampled, row by row
      (a decode CUDA graph of a few rows computes it for every row, padding included, and
      keeps the sampled ones), so it must not depend on which rows it is given;
    - ``greedy_ids(logits) -> ids`` (optional; else ``logits.argmax(-1)``): each row's
      argmax, exactly as ``torch.argmax`` gives it, for a decode graph to capture.  One
      that also takes ``ids_out=`` (an int32 tensor of the rows' length) stores the ids
      there too, which lets a decode graph leave them where the next step's graph reads
      its input ids (``DecodeGraphs``, ``PAGEDLLM_GRAPH_FEEDS_IDS``).

    Two plugins registering the same architecture is an error naming both.
    """
