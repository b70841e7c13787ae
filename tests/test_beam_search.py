"""Beam search: same beams as HF transformers, with beams sharing blocks copy-on-write."""
from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, BeamSearchParams, InvalidRequestError

from tiny_models import build_tiny_model, random_prompts


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_model(request.param, d)
    return str(d), hf


@pytest.mark.parametrize("width", [1, 3, 4])
def test_beams_match_hf_generate_num_beams(tiny, width):
    model_dir, hf = tiny
    llm = LLM(model=model_dir, device="cpu", num_kv_blocks=256, block_size=4)
    prompts = random_prompts([7, 13], seed=width)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                           BeamSearchParams(beam_width=width, max_tokens=8, ignore_eos=True))
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), num_beams=width, num_return_sequences=width,
                          do_sample=False, max_new_tokens=8, min_new_tokens=8,
                          output_scores=True, return_dict_in_generate=True)
        want = [row[len(p):].tolist() for row in ref.sequences]
        got = [s.tokens[len(p):] for s in out.sequences]
        assert got == want
        scores = getattr(ref, "sequences_scores", None)  # HF's width 1 is plain greedy
        for seq, score in zip(out.sequences, scores if scores is not None else []):
            assert seq.cum_logprob / 8 == pytest.approx(float(score), abs=1e-4)
    s = llm.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def _hf_beams(hf, prompt, width, max_tokens, eos, length_penalty, early_stopping):
    """HF's returned beams (each cut after its EOS, as HF pads after it) and their scores."""
    ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                      do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos,
                      pad_token_id=eos, length_penalty=length_penalty,
                      early_stopping=early_stopping,
                      output_scores=True, return_dict_in_generate=True)
    beams = []
    for row in ref.sequences:
        tokens = row[len(prompt):].tolist()
        beams.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return beams, ref.sequences_scores.tolist()


@pytest.mark.parametrize("width,length_penalty,eos_at,early_stopping", [
    (2, 1.0, 1, False), (3, 0.0, 1, False), (4, 1.0, 1, False), (4, 2.0, 1, False),
    (2, 1.0, 0, False), (3, 0.0, 0, False), (3, 0.0, 0, True), (2, 1.0, 1, True),
    (3, 0.5, 0, "never"), (2, 1.0, 1, "never")])
def test_beams_that_end_match_hf_generate(tiny, width, length_penalty, eos_at,
                                          early_stopping):
    """With an end-of-sequence token that the beams do meet, HF's rules: which hypotheses
    end, how they score, and when a prompt is done.  The EOS is the token the best free
    beam chooses at position ``eos_at``, so hypotheses end early and the live ones go on
    past them; at position 0 some prompts end before ``max_tokens`` (HF's early stop)."""
    model_dir, hf = tiny
    llm = LLM(model=model_dir, device="cpu", num_kv_blocks=256, block_size=4)
    prompts = random_prompts([9, 14], seed=10 + width)
    ended = 0
    for prompt in prompts:
        free = llm.beam_search({"prompt_token_ids": prompt},
                               BeamSearchParams(beam_width=width, max_tokens=10,
                                                ignore_eos=True))[0]
        eos = free.sequences[0].tokens[len(prompt) + eos_at]
        llm.engine.eos_token_ids = {eos}
        out = llm.beam_search({"prompt_token_ids": prompt},
                              BeamSearchParams(beam_width=width, max_tokens=10,
                                               length_penalty=length_penalty,
                                               early_stopping=early_stopping))[0]
        want, scores = _hf_beams(hf, prompt, width, 10, eos, length_penalty, early_stopping)
        assert [s.tokens[len(prompt):] for s in out.sequences] == want
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        for s in out.sequences:
            generated = s.tokens[len(prompt):]
            assert s.finished == (generated[-1] == eos)
            assert s.score == pytest.approx(s.cum_logprob / len(generated) ** length_penalty)
        ended += sum(s.finished for s in out.sequences)
    assert ended > 0  # the case this test is for: some hypotheses ended by EOS
    s = llm.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_beams_share_the_prompt_blocks(tiny):
    model_dir, _ = tiny
    llm = LLM(model=model_dir, device="cpu", num_kv_blocks=512, block_size=4,
              enable_prefix_caching=False)
    prompt = random_prompts([120], seed=0)[0]
    llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=10,
                                                                   ignore_eos=True))
    s = llm.stats()
    # 30 prompt blocks held once; every beam keeps at most a few blocks of its own
    # (10 tokens = 3 blocks), plus the parents held during one hand-over
    assert s["kv_blocks_peak"] <= 30 + 2 * 4 * 3
    assert s["num_tokens_computed"] == 120 + 9 * 4  # the prompt is computed once
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_eos_ends_a_hypothesis(tiny):
    model_dir, hf = tiny
    llm = LLM(model=model_dir, device="cpu", num_kv_blocks=256, block_size=4)
    prompt = random_prompts([9], seed=4)[0]
    free = llm.beam_search({"prompt_token_ids": prompt},
                           BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))[0]
    # make the best beam's second token the end-of-sequence token
    eos = free.sequences[0].tokens[len(prompt) + 1]
    llm.engine.eos_token_ids = {eos}
    # Without length normalisation the ended hypothesis scores its prefix's cumulative
    # logprob, at least that of the best full-length beam it was a prefix of: it must win.
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.0))[0]
    best = out.sequences[0]
    assert best.finished and best.tokens == free.sequences[0].tokens[: len(prompt) + 2]
    assert all(eos not in s.tokens[len(prompt):-1] for s in out.sequences)
    assert all(len(s.tokens) - len(prompt) <= 6 for s in out.sequences)
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_bad_beam_params_name_the_field():
    with pytest.raises(InvalidRequestError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(InvalidRequestError, match="early_stopping"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
