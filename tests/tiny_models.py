"""Random tiny HF checkpoints for tests: one builder per supported architecture.

``build_tiny_model(name, directory)`` makes a seeded random transformers model, saves it as a
*sharded* safetensors checkpoint without a tokenizer, and returns the HF model (fp32, eval)
so a test can use it as the reference.  Every parameter transformers initialises to a
constant (norm weights to 1, biases to 0) is randomised too, so loading one into the wrong
place, or not at all, changes the output.

``hf_greedy(model, prompt, n)`` is the reference greedy continuation: one prompt, no padding,
and the raw (unprocessed) logits of every step, so a test can check the continuation has no
near-ties that would make token-for-token comparison a coin toss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 300
EOS = 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    initializer_range=0.2,  # large weights: well separated logits, no greedy near-ties
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=EOS,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the positions tests use fall on both sides of the scaled wavelengths.
    "original_max_position_embeddings": 32,
    "rope_theta": 10000.0,
}


@dataclass(frozen=True)
class TinySpec:
    architecture: str  # the transformers class name, also config.json's `architectures`
    config_overrides: dict
    seed: int = 0  # chosen so the reference continuations have no greedy near-ties


TINY_MODELS: dict[str, TinySpec] = {
    "llama": TinySpec("LlamaForCausalLM", {"num_hidden_layers": 3}),
    "llama3_rope": TinySpec("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE}),
    "llama_tied": TinySpec("LlamaForCausalLM", {"tie_word_embeddings": True}, seed=3),
    "mistral": TinySpec("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": TinySpec("Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # q/k/v bias
    # q/k norm, and a head_dim that is not hidden_size / num_attention_heads (64 / 4).
    "qwen3": TinySpec("Qwen3ForCausalLM", {"head_dim": 32}),
}


def _classes(architecture: str):
    import transformers

    model_cls = getattr(transformers, architecture)
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    return config_cls, model_cls


def make_hf_model(name: str):
    """The seeded random HF model of ``TINY_MODELS[name]`` (fp32, eval mode)."""
    spec = TINY_MODELS[name]
    config_cls, model_cls = _classes(spec.architecture)
    config = config_cls(**{**_COMMON, **spec.config_overrides})
    config.architectures = [spec.architecture]
    torch.manual_seed(spec.seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:  # norm weights (ones) and biases (zeros) by default
                if "norm" in pname:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
    # The reference is pure greedy over the whole vocabulary, as the engine's ignore_eos is:
    # no end-of-sequence token to stop at or to ban before min_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def build_tiny_model(name: str, directory: str | Path, max_shard_size: str = "200KB"):
    """Save ``make_hf_model(name)`` as a sharded safetensors checkpoint; return the model."""
    model = make_hf_model(name)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    return model


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class GreedyReference:
    prompt: list[int]
    tokens: list[int]  # the n generated tokens
    step_logits: torch.Tensor  # [n, vocab] raw logits that chose each token

    @property
    def min_margin(self) -> float:
        """Smallest gap between the best and second-best logit over all steps."""
        top2 = torch.topk(self.step_logits, 2, dim=-1).values
        return float((top2[:, 0] - top2[:, 1]).min())


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int, eos_ends: bool = True) -> GreedyReference:
    """HF ``generate`` greedy continuation of one unpadded prompt, exactly ``n`` tokens, on
    the model's device.  By default EOS is forbidden (``min_new_tokens``); with
    ``eos_ends=False`` it may be chosen and generation goes on, as ``ignore_eos`` does
    (forbidding it would change the choice wherever a short answer ends)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    ends = dict(min_new_tokens=n) if eos_ends else dict(eos_token_id=None, pad_token_id=0)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **ends,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.cat([step.float() for step in out.logits], dim=0).cpu()
    assert len(tokens) == n and logits.shape[0] == n
    return GreedyReference(list(prompt), tokens, logits)


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF forward logits [len(token_ids), vocab] of one unpadded sequence."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


def random_prompts(lengths: list[int], seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_well_separated(refs: list[GreedyReference], min_gap: float = 1e-3) -> None:
    """Test-design guard: greedy outputs compared token for token must not hinge on a
    near-tie (the engine and HF differ by ~1e-5 in fp32)."""
    worst = min(r.min_margin for r in refs)
    assert worst > min_gap, (
        f"test design: a reference step has a top-2 logit gap of {worst:.2e}; pick another "
        f"seed or prompts so greedy decoding is not decided by rounding"
    )
    assert not math.isnan(worst)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def output_token_ids(outputs) -> list[list[int]]:
    """The first sequence's token ids of each RequestOutput."""
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_all_blocks_free(llm) -> None:
    """Nothing left running or waiting, and every KV block back in the pool."""
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
