"""The benchmarks' ``--json`` figures and issue 5's target table read from them."""
from __future__ import annotations

import json

import pytest

from pagedllm.bench import latency, targets, throughput
from pagedllm.bench.figures import write_figures
from pagedllm.bench.workloads import w1_requests

# A tiny Qwen3 shape whose context holds W1's longest requests.
TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512,
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
            rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-shape")
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def test_latency_writes_its_figures(tiny_shape, tmp_path):
    out = tmp_path / "w2.json"
    latency.main(["--model", str(tiny_shape), "--input-len", "8", "--output-len", "5",
                  "--runs", "1", "--compare", "hf", "--json", str(out)])
    f = json.loads(out.read_text())
    assert (f["workload"], f["device"], f["floor_s"]) == ("W2", "cpu", None)
    ours, hf = f["engines"]["pagedllm"], f["engines"][targets.HF]
    assert 0 < ours["tpot_s"] < ours["ttft_s"] + 10 and hf["tpot_s"] > 0
    # No floor on a CPU: the target reads as not run, never as met.
    (tmp_path / "w2-qwen3.json").write_text(out.read_text())
    qwen = targets.check(tmp_path)[3]
    assert qwen.met is None and "no floor" in qwen.peer


def test_throughput_writes_its_figures(tiny_shape, tmp_path):
    out = tmp_path / "w1.json"
    throughput.main(["--model", str(tiny_shape), "--num-requests", "2", "--compare", "hf",
                     "--hf-num-requests", "1", "--json", str(out)])
    f = json.loads(out.read_text())
    assert (f["workload"], f["num_requests"], f["ceiling_tok_s"]) == ("W1", 2, None)
    assert f["output_tokens"] == sum(m for _, m in w1_requests(2))  # every one, in full
    assert f["engines"]["pagedllm"]["out_tok_s"] > 0 < f["engines"][targets.HF]["out_tok_s"]


def _write_run(d, w1_tok_s=23_553.0, hf_tok_s=375.0, ceiling=35_227.0, qwen_tpot=0.558e-3,
               llama_tpot=4.115e-3, of_copy=1.009, w1_model="qwen3-0.6b", w1_tokens=133_966,
               llama_model="llama-3.1-8b"):
    dev = "NVIDIA H100 80GB HBM3"
    write_figures(d / "w1.json", {"device": dev, "model": w1_model, "output_tokens": w1_tokens,
                                  "ceiling_tok_s": ceiling,
                                  "engines": {"pagedllm": {"out_tok_s": w1_tok_s},
                                              targets.HF: {"out_tok_s": hf_tok_s}}})
    for name, model, tpot, floor in (("w2-qwen3", "qwen3-0.6b", qwen_tpot, 0.280e-3),
                                     ("w2-llama8b", llama_model, llama_tpot, 3.774e-3)):
        write_figures(d / f"{name}.json", {"device": dev, "model": model, "floor_s": floor,
                                           "device_step_s": tpot * 0.99,
                                           "engines": {"pagedllm": {"tpot_s": tpot,
                                                                    "ttft_s": 0.01}}})
    write_figures(d / "w6.json", {"device": dev, "rows": [
        {"batch": 1, "context": 4096, "triton": {"us": 10.0, "of_copy": 0.1}},
        {"batch": 128, "context": 4096, "triton": {"us": 501.5, "of_copy": of_copy},
         "torch": {"us": 7148.0, "of_copy": 0.07}}]})


def test_targets_met_when_every_figure_is_within_its_limit(tmp_path):
    _write_run(tmp_path)
    checks = targets.check(tmp_path)
    assert [c.met for c in checks] == [True] * 6, targets.table(checks)
    text = targets.table(checks)
    assert "62.8x" in text and "66.9%" in text and "1.99x" in text and "100.9% of copy" in text


@pytest.mark.parametrize("change,missed", [
    ({"w1_tok_s": 14_000.0}, 0),  # under 15,000 tok/s (and so under 60 % of 35,227)
    ({"hf_tok_s": 800.0}, 1),  # 23,553 / 800 = 29.4x
    ({"ceiling": 40_000.0}, 2),  # 58.9 % of the ceiling
    ({"qwen_tpot": 0.561e-3}, 3),  # 2.004x the floor
    ({"llama_tpot": 4.35e-3}, 4),  # 1.153x
    ({"of_copy": 0.79}, 5),
])
def test_each_target_misses_on_its_own_figure(tmp_path, change, missed):
    _write_run(tmp_path, **change)
    met = [c.met for c in targets.check(tmp_path)]
    assert met[missed] is False
    assert all(m for i, m in enumerate(met) if i != missed and not (missed == 0 and i == 2))


@pytest.mark.parametrize("change,unjudged", [
    ({"w1_tokens": 30_000}, [0, 1, 2]),  # fewer requests than W1's
    ({"w1_model": "llama-3.1-8b"}, [0, 1, 2]),
    ({"llama_model": "qwen3-0.6b"}, [4]),
])
def test_another_workload_gets_no_verdict(tmp_path, change, unjudged):
    _write_run(tmp_path, **change)
    checks = targets.check(tmp_path)
    assert [i for i, c in enumerate(checks) if c.met is None] == unjudged
    assert all(checks[i].figure for i in unjudged)  # its figures still show
    assert targets.table(checks).count("unjudged") == len(unjudged)


def test_missing_runs_read_as_not_run(tmp_path):
    _write_run(tmp_path)
    (tmp_path / "w1.json").unlink()
    (tmp_path / "w6.json").write_text("{truncated")
    met = [c.met for c in targets.check(tmp_path)]
    assert met == [None, None, None, True, True, None]
    assert "not run" in targets.table(targets.check(tmp_path))
