"""pagedllm's GGUF reader (``gguf.GGUFReader`` slicing a plain view of its memory map) reads
the same metadata and tensors as the gguf package's own reader."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from pagedllm.loader.gguf_file import open_reader


def _same(ours, theirs) -> None:
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].types == field.types, name
        assert ours.fields[name].contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist()
        assert a.data_offset == b.data_offset
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_reader_matches_gguf_on_a_written_file(tmp_path, endianess):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    writer.add_block_count(2)
    writer.add_uint64("test.u64", 2**40 + 3)
    writer.add_float32("test.f32", 0.125)
    writer.add_bool("test.flag", True)
    writer.add_string("test.name", "pagedllm ✓")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)] + ["", "é"])
    writer.add_array("tokenizer.ggml.scores", [float(i) / 7 for i in range(302)])
    writer.add_tensor("token_embd.weight", rng.standard_normal((302, 16)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((16, 16)).astype(np.float16))
    writer.add_tensor("output_norm.weight", rng.standard_normal(16).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = open_reader(path)
    assert ours.fields["test.name"].contents() == "pagedllm ✓"
    assert ours.fields["tokenizer.ggml.tokens"].contents()[-1] == "é"
    assert ours.fields["test.u64"].contents() == 2**40 + 3
    _same(ours, gguf.GGUFReader(str(path)))


@pytest.mark.slow
def test_reader_matches_gguf_on_smollm2(smollm2_path):
    _same(open_reader(smollm2_path), gguf.GGUFReader(str(smollm2_path)))
