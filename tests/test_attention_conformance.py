"""The conformance test every attention backend must pass (see ``register_attention_backends``).

Each installed backend runs mixed batches (prefill chunks over cached context, fresh
prefills, decodes, in random order) over a paged cache with shuffled, non-contiguous block
tables whose unused slots hold stale garbage.  Its output is compared with naive causal
softmax attention computed here, in float64, from each sequence's full K/V history kept as
plain tensors -- never through a backend -- and the cache it leaves behind is checked: new
K/V in exactly the slots ``slot_mapping`` names, nothing else touched.

The cached context gets into the paged cache in one of two ways:

- ``direct``: written here, slot by slot, for backends whose cache uses the reference
  layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (the ``torch`` backend's);
- ``via_backend``: by an earlier ``forward`` over the context tokens (as the engine does),
  for every backend, whatever its layout.  That earlier call's output is checked too.

A new backend is picked up from the plugin registry automatically; one whose
``supports(head_dim, dtype, device)`` says no is skipped for that case, with the reason.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm.attention import AttentionMetadata
from pagedllm.plugin_manager import get_registry
from pagedllm.plugins.attention.torch_backend import TorchAttentionBackend
from paged_tables import shuffled_block_tables

BACKENDS = get_registry().names("attention")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NUM_HEADS = 4
# Against a float64 reference from the same (rounded) inputs.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_torch_backend_is_registered():
    registry = get_registry()
    assert "torch" in BACKENDS
    entry = registry.get("attention", "torch")
    assert entry.cls is TorchAttentionBackend
    assert entry.cls.supports(head_dim=64, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_declares_the_contract(name):
    cls = get_registry().get("attention", name).cls
    assert cls.name == name
    assert isinstance(cls.priority, int)
    shape = tuple(cls.kv_cache_shape(7, 4, 2, 16))
    assert shape[cls.block_dim] == 7, f"axis block_dim={cls.block_dim} of {shape} must index blocks"


# ---- building a case ---------------------------------------------------------------------

@dataclass
class Seq:
    context: int  # tokens whose K/V are already cached
    query_len: int  # new tokens this step

    @property
    def total(self) -> int:
        return self.context + self.query_len


@dataclass
class Case:
    seqs: list[Seq]  # in batch order
    head_dim: int
    num_kv_heads: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    seed: int


def _mixed_batch(rng: random.Random, block_size: int) -> list[Seq]:
    """At least one of each kind, plus a few random ones, in random order."""
    span = 3 * block_size
    seqs = [
        Seq(rng.randint(1, span), rng.randint(2, 2 * block_size)),  # chunk over cached context
        Seq(rng.choice([block_size, 2 * block_size]), rng.randint(2, block_size)),  # aligned
        Seq(0, rng.randint(2, 2 * block_size)),  # fresh prefill
        Seq(rng.randint(1, span), 1),  # decode
        Seq(rng.choice([block_size - 1, block_size]), 1),  # decode that fills/opens a block
    ]
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["chunk", "fresh", "decode", "one_token_prompt"])
        if kind == "chunk":
            seqs.append(Seq(rng.randint(1, span), rng.randint(2, 2 * block_size)))
        elif kind == "fresh":
            seqs.append(Seq(0, rng.randint(2, 2 * block_size)))
        elif kind == "decode":
            seqs.append(Seq(rng.randint(1, span), 1))
        else:
            seqs.append(Seq(0, 1))
    rng.shuffle(seqs)
    return seqs


def _supported_or_skip(cls, head_dim, dtype, device):
    if not cls.supports(head_dim=head_dim, dtype=dtype, device=device):
        pytest.skip(f"{cls.name}: supports(head_dim={head_dim}, dtype={dtype}, "
                    f"device={device}) is False")


def _reference_layout(cls, case: Case, num_blocks: int) -> bool:
    expected = TorchAttentionBackend.kv_cache_shape(
        num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    actual = cls.kv_cache_shape(num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    return tuple(actual) == tuple(expected) and cls.block_dim == 1


def _metadata(seqs: list[Seq], tables: list[list[int]], block_size: int,
              device: torch.device) -> AttentionMetadata:
    """Metadata built the way the model runner builds it (tables padded with block 0)."""
    slots, qsl = [], [0]
    for s, table in zip(seqs, tables):
        for pos in range(s.context, s.total):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + s.query_len)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s.total for s in seqs], dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        max_query_len=max(s.query_len for s in seqs),
        max_seq_len=max(s.total for s in seqs),
        query_lens_host=[s.query_len for s in seqs],
        seq_lens_host=[s.total for s in seqs],
    )


def _naive_attention(q, k, v, context: int, scale: float) -> torch.Tensor:
    """q [n, h, d] at positions context..context+n-1; k, v [context+n, kvh, d]; float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # GQA: query head j reads kv head j // group
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(context, context + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def _slot_view(cache: torch.Tensor, which: int, num_kv_heads: int, head_dim: int):
    """Reference layout only: K (which=0) or V (1) as [num_slots, kv_heads, head_dim]."""
    return cache[which].reshape(-1, num_kv_heads, head_dim)


def _changed_blocks(before: torch.Tensor, after: torch.Tensor, block_dim: int) -> set[int]:
    diff = (before != after) & ~(before.isnan() & after.isnan())
    other = [d for d in range(diff.dim()) if d != block_dim]
    return set(torch.nonzero(diff.any(dim=other) if other else diff).flatten().tolist())


def run_case(cls, case: Case, mode: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    rng = random.Random(case.seed)
    bs, kvh, d, dtype, dev = case.block_size, case.num_kv_heads, case.head_dim, case.dtype, case.device
    seqs = case.seqs

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    # Full K/V history of every sequence, as plain tensors (already rounded to dtype).
    keys = [randn(s.total, kvh, d) for s in seqs]
    values = [randn(s.total, kvh, d) for s in seqs]
    queries = [randn(s.total, NUM_HEADS, d) for s in seqs]  # the context rows feed via_backend
    scale = rng.uniform(0.5, 1.5) * d**-0.5

    # Shuffled, non-contiguous block tables with spare blocks nobody owns.
    tables, num_blocks = shuffled_block_tables(rng, [s.total for s in seqs], bs, spare=3)

    backend = cls(NUM_HEADS, kvh, d, scale)
    # Stale garbage everywhere (what reused blocks hold): finite, and large enough that
    # reading a slot that should be masked or unowned shows up in the output.
    shape = cls.kv_cache_shape(num_blocks, bs, kvh, d)
    kv_cache = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).to(dtype).to(dev)

    if mode == "direct":
        assert _reference_layout(cls, case, num_blocks)
        for which, hist in ((0, keys), (1, values)):
            flat = _slot_view(kv_cache, which, kvh, d)
            for s, table, h in zip(seqs, tables, hist):
                for pos in range(s.context):
                    flat[table[pos // bs] * bs + pos % bs] = h[pos].to(dev)
    else:  # via_backend: the context goes in as fresh prefills, as the engine would do it
        hist = [(s, t, i) for i, (s, t) in enumerate(zip(seqs, tables)) if s.context > 0]
        if hist:
            hseqs = [Seq(0, s.context) for s, _, _ in hist]
            md = _metadata(hseqs, [t for _, t, _ in hist], bs, dev)
            q = torch.cat([queries[i][: s.context] for s, _, i in hist]).to(dev)
            k = torch.cat([keys[i][: s.context] for s, _, i in hist]).to(dev)
            v = torch.cat([values[i][: s.context] for s, _, i in hist]).to(dev)
            out = backend.forward(q, k, v, kv_cache, md).cpu()
            expected = torch.cat([
                _naive_attention(queries[i][: s.context], keys[i][: s.context],
                                 values[i][: s.context], 0, scale) for s, _, i in hist])
            torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype],
                                       msg=lambda m: f"context prefill call: {m}")

    # The step under test.
    md = _metadata(seqs, tables, bs, dev)
    q = torch.cat([qq[s.context :] for s, qq in zip(seqs, queries)]).to(dev)
    k = torch.cat([kk[s.context :] for s, kk in zip(seqs, keys)]).to(dev)
    v = torch.cat([vv[s.context :] for s, vv in zip(seqs, values)]).to(dev)
    inputs = (q.clone(), k.clone(), v.clone())
    before = kv_cache.clone()
    out = backend.forward(q, k, v, kv_cache, md)

    assert out.shape == (q.shape[0], NUM_HEADS, d) and out.dtype == dtype
    assert out.device == q.device
    for given_, kept in zip((q, k, v), inputs):
        assert torch.equal(given_, kept), "forward must not modify query/key/value"
    start = 0
    for i, s in enumerate(seqs):
        expected = _naive_attention(queries[i][s.context :], keys[i], values[i], s.context, scale)
        got = out[start : start + s.query_len].cpu().double()
        kind = "decode" if s.query_len == 1 and s.context else (
            "fresh prefill" if s.context == 0 else "prefill chunk")
        torch.testing.assert_close(
            got, expected, **TOLERANCE[dtype],
            msg=lambda m: f"sequence {i} ({kind}, context {s.context}, "
                          f"query_len {s.query_len}): {m}")
        start += s.query_len

    # The cache: new K/V exactly at slot_mapping, nothing else touched.
    slots = md.slot_mapping.cpu()
    if _reference_layout(cls, case, num_blocks):
        expected_cache = before.clone()
        _slot_view(expected_cache, 0, kvh, d)[slots.to(dev)] = k
        _slot_view(expected_cache, 1, kvh, d)[slots.to(dev)] = v
        assert torch.equal(kv_cache, expected_cache), "new K/V not (only) at slot_mapping"
    written_blocks = set((slots // bs).tolist())
    changed = _changed_blocks(before, kv_cache, cls.block_dim)
    assert changed <= written_blocks, (
        f"forward changed blocks {sorted(changed - written_blocks)} that no new token maps to")


# ---- the tests -----------------------------------------------------------------------------

def _modes(cls, device, dtype, head_dim, num_kv_heads, block_size):
    case = Case([], head_dim, num_kv_heads, block_size, dtype, device, 0)
    return ["direct", "via_backend"] if _reference_layout(cls, case, 8) else ["via_backend"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("name", BACKENDS)
def test_mixed_batch_matches_naive_attention(name, head_dim, num_kv_heads, block_size, dtype,
                                             device):
    cls = get_registry().get("attention", name).cls
    device = torch.device(device)
    _supported_or_skip(cls, head_dim, dtype, device)
    for mode in _modes(cls, device, dtype, head_dim, num_kv_heads, block_size):
        for repeat in range(2):
            seed = zlib.crc32(f"{name}-{head_dim}-{num_kv_heads}-{block_size}-{dtype}-"
                              f"{repeat}".encode())
            seqs = _mixed_batch(random.Random(seed), block_size)
            run_case(cls, Case(seqs, head_dim, num_kv_heads, block_size, dtype, device, seed),
                     mode)


@pytest.mark.parametrize("name", BACKENDS)
def test_random_batches_match_naive_attention(name):
    """Hypothesis explores batch shapes: 1..6 sequences of any mix, fp32 on CPU."""
    cls = get_registry().get("attention", name).cls
    device, dtype = torch.device("cpu"), torch.float32
    head_dims = [hd for hd in (16, 32, 64) if cls.supports(head_dim=hd, dtype=dtype,
                                                             device=device)]
    if not head_dims:
        pytest.skip(f"{name}: supports no head_dim of 16, 32, 64 in fp32 on cpu")

    seq = st.builds(Seq, context=st.integers(0, 40), query_len=st.integers(1, 24))

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(
        seqs=st.lists(seq, min_size=1, max_size=6),
        head_dim=st.sampled_from(head_dims),
        num_kv_heads=st.sampled_from([4, 2, 1]),
        block_size=st.sampled_from([4, 16]),
        seed=st.integers(0, 2**31 - 1),
        mode=st.sampled_from(["direct", "via_backend"]),
    )
    def check(seqs, head_dim, num_kv_heads, block_size, seed, mode):
        case = Case(seqs, head_dim, num_kv_heads, block_size, dtype, device, seed)
        if mode == "direct" and not _reference_layout(cls, case, 8):
            mode = "via_backend"
        run_case(cls, case, mode)

    check()


class _FlatLayoutBackend(TorchAttentionBackend):
    """The torch backend behind a different cache shape, so the harness's path for layouts
    it cannot look inside is exercised even while ``torch`` is the only backend."""

    name = "_flat_layout_test_double"

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size * num_kv_heads * head_dim)

    def forward(self, query, key, value, kv_cache, metadata):
        two, num_blocks, flat = kv_cache.shape
        view = kv_cache.view(two, num_blocks, flat // (self.num_kv_heads * self.head_dim),
                             self.num_kv_heads, self.head_dim)
        return super().forward(query, key, value, view, metadata)


def test_harness_handles_other_cache_layouts():
    cls = _FlatLayoutBackend
    for seed in range(4):
        case = Case(_mixed_batch(random.Random(seed), 4), 32, 2, 4, torch.float32,
                    torch.device("cpu"), seed)
        assert not _reference_layout(cls, case, 8)
        run_case(cls, case, "via_backend")


# ---- fused rotary (optional: fuses_rotary) -------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "rope+qk-norm"])
@pytest.mark.parametrize("name", BACKENDS)
def test_fused_rotary_equals_rotating_first(name, qk_norm):
    """A backend that says ``fuses_rotary`` for a decode step must give, from unrotated q/k
    and ``rotary=``, what it gives from q/k rotated first by the model's own op (whose path
    the tests above check against naive attention): same output, same cache."""
    from pagedllm.attention import RotaryInputs
    from pagedllm.plugins.models import fused_ops
    from pagedllm.plugins.models.rope import RotaryEmbedding

    cls = get_registry().get("attention", name).cls
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head_dim, kv_heads, block_size, dtype = 32, 2, 4, torch.float32
    _supported_or_skip(cls, head_dim, dtype, device)
    rng = random.Random(zlib.crc32(f"{name}{qk_norm}".encode()))
    gen = torch.Generator(device=device).manual_seed(rng.randrange(1 << 30))
    seqs = [Seq(rng.randint(0, 3 * block_size), 1) for _ in range(4)]
    tables, num_blocks = shuffled_block_tables(rng, [s.total for s in seqs], block_size,
                                               spare=2)
    md = _metadata(seqs, tables, block_size, device)
    backend = cls(NUM_HEADS, kv_heads, head_dim, head_dim**-0.5)
    if not backend.fuses_rotary(md):
        pytest.skip(f"{name}: does not fuse the rotary embedding")

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    cache = randn(*cls.kv_cache_shape(num_blocks, block_size, kv_heads, head_dim))
    q, k, v = randn(4, NUM_HEADS, head_dim), randn(4, kv_heads, head_dim), randn(4, kv_heads,
                                                                                 head_dim)
    norms = (1 + 0.3 * randn(head_dim), 1 + 0.3 * randn(head_dim), 1e-6) if qk_norm else None
    positions = md.seq_lens.long() - 1
    # The fused path gathers from a table of max_positions rows: it must cover the step.
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0, "rope_type": "default"},
                           max_positions=int(positions.max()) + 1)
    cos, sin = rope.cos_sin(positions, dtype, as_float32=True)
    rq, rk = fused_ops.rotary(q.cpu(), k.cpu(), (cos.cpu(), sin.cpu()),
                              qk_norm=None if norms is None else
                              (norms[0].cpu(), norms[1].cpu(), norms[2]))
    want_cache = cache.clone()
    want = cls(NUM_HEADS, kv_heads, head_dim, head_dim**-0.5).forward(
        rq.to(device), rk.to(device), v, want_cache, md)
    got_cache = cache.clone()
    fused = RotaryInputs(cos.reshape(4, -1), sin.reshape(4, -1), *(norms or (None, None, 0.0)))
    got = backend.forward(q, k, v, got_cache, md, rotary=fused)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_cache, want_cache, atol=1e-5, rtol=1e-5)
