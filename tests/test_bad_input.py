"""Bad input gets a clear error naming the field or file, and disturbs nothing else."""
from __future__ import annotations

import shutil

import pytest

from pagedllm import LLM, InvalidRequestError, SamplingParams
from pagedllm.loader.errors import ModelLoadError
from pagedllm.plugin_manager import PluginError



@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(model=str(tiny_dir), device="cpu", max_model_len=64)


@pytest.mark.parametrize("field,kwargs", [
    ("max_tokens", dict(max_tokens=0)),
    ("temperature", dict(temperature=-0.1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=1.5)),
    ("min_tokens", dict(min_tokens=5, max_tokens=2)),
    ("repetition_penalty", dict(repetition_penalty=0)),
    ("presence_penalty", dict(presence_penalty=3)),
    ("logprobs", dict(logprobs=-1)),
    ("n", dict(n=0)),
])
def test_invalid_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_empty_and_too_long_prompts(tiny_llm):
    with pytest.raises(InvalidRequestError, match="prompt.*empty"):
        tiny_llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"prompt.*64 tokens.*max_model_len"):
        tiny_llm.generate({"prompt_token_ids": [3] * 64}, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        tiny_llm.generate({"prompt_token_ids": [3] * 60}, SamplingParams(max_tokens=10),
                          use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids.*outside"):
        tiny_llm.generate({"prompt_token_ids": [3, 10**6]}, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        tiny_llm.generate("text needs a tokenizer", use_tqdm=False)


def test_one_bad_prompt_in_a_batch_names_its_index_and_starts_nothing(tiny_llm):
    good = {"prompt_token_ids": [4, 5, 6]}
    with pytest.raises(InvalidRequestError, match="prompt 1"):
        tiny_llm.generate([good, {"prompt_token_ids": []}, good], use_tqdm=False)
    stats = tiny_llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_rejected_request_does_not_disturb_running_ones(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[7, 8, 9, 10], [20, 21]]
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    engine = tiny_llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"ok{i}", {"prompt_token_ids": p}, params)
    engine.step()
    engine.step()
    for bad in ({"prompt_token_ids": []}, {"prompt_token_ids": [1] * 100}):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", bad, params)
    mutated = SamplingParams()
    mutated.temperature = -1.0  # dataclasses can be changed after construction
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.add_request("bad", {"prompt_token_ids": [1]}, mutated)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done["ok0"], done["ok1"]] == want


def test_unknown_model_path_and_plugin_names(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no/such/model"):
        LLM(model="/no/such/model")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(tmp_path))
    with pytest.raises(PluginError, match="unknown attention plugin 'flashy'.*torch"):
        LLM(model=str(tiny_dir), attention_backend="flashy")
    with pytest.raises(PluginError, match="unknown scheduler plugin 'sjf'.*fcfs"):
        LLM(model=str(tiny_dir), scheduler="sjf")
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_dir), dtype="int3")


def test_truncated_safetensors_names_the_file(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"{shard.name}.*truncated"):
        LLM(model=str(broken))


def test_truncated_gguf_names_the_file(smollm2_path, tmp_path):
    broken = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        broken.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        LLM(model=str(broken))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="weights.bin.*not a .gguf"):
        LLM(model=str(not_gguf))
