"""Sampling keeps ids as sampled, stops at the EOS (inclusive) and scores them under the raw model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lit.data.collate import pad_rows
from dpo_lit.data.errors import DataError
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.models import build_tiny_model, load_model, load_tokenizer
from dpo_lit.sampling.kl import sequence_logps
from dpo_lit.sampling.sample import generate_kwargs, sample

EOS, PAD = 1, 0
SHORT, LONG = [2, 3], [4, 5, 6, 7, 2, 3, 5]


@pytest.fixture(scope="module")
def small_vocab_model() -> PreTrainedModel:
    """A tiny Llama over 8 token ids: the EOS (id 1) is likely enough to end some completions."""
    return build_tiny_model(8, seed=1).eval()


def test_the_same_seed_gives_the_same_samples_and_leaves_the_global_rng(
    small_vocab_model: PreTrainedModel,
) -> None:
    kwargs = {"num_samples": 3, "max_new_tokens": 6, "eos_token_id": EOS, "pad_token_id": PAD}
    state = torch.get_rng_state()
    first = sample(small_vocab_model, None, [SHORT, LONG], seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample(small_vocab_model, None, [SHORT, LONG], seed=7, **kwargs) == first
    assert sample(small_vocab_model, None, [SHORT, LONG], seed=8, **kwargs) != first
    assert [s.prompt_index for s in first] == [0, 0, 0, 1, 1, 1]
    assert [s.prompt_ids for s in first] == [SHORT] * 3 + [LONG] * 3


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_prompt_seeds_make_a_prompts_samples_independent_of_its_batch(small_vocab_model: PreTrainedModel, top_p) -> None:
    """With a seed per prompt, three prompts sampled together in rows of 4 give each prompt the
    samples it gets alone in one batch: what predict under DDP relies on."""
    prompts, seeds = [[2, 3, 4], [5, 6], [7, 2, 3, 4]], [11, 22, 33]
    kwargs = dict(num_samples=3, max_new_tokens=8, temperature=0.9, top_p=top_p, eos_token_id=0, pad_token_id=0)
    together = sample(small_vocab_model, None, prompts, batch_size=4, prompt_seeds=seeds, **kwargs)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = sample(small_vocab_model, None, [prompt], batch_size=16, prompt_seeds=[seed], **kwargs)
        assert [s.completion_ids for s in together if s.prompt_index == i] == [s.completion_ids for s in alone]
    assert len({tuple(s.completion_ids) for s in together}) > 3  # the draws differ between rows


@pytest.mark.parametrize("batch_size, seeded", [(16, False), (4, False), (4, True)])
def test_a_prompts_samples_share_its_encoding_and_are_the_samples_without_sharing(
    small_vocab_model: PreTrainedModel, batch_size, seeded
) -> None:
    """share_prompts: each prompt of a batch is encoded once (one forward over its tokens but the
    last) and its samples start from that KV cache; the samples and their log-probs are those of
    encoding it once per sample, whether a prompt's samples share a batch or are split over two."""
    prompts = [[2, 3, 4, 5, 6, 7], [5, 6], [7, 2, 3, 4, 5]]
    kwargs = dict(num_samples=3, max_new_tokens=8, batch_size=batch_size, seed=5, eos_token_id=EOS, pad_token_id=PAD,
                  prompt_seeds=[11, 22, 33] if seeded else None)  # fmt: skip
    seen = []
    hook = small_vocab_model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        shared = sample(small_vocab_model, None, prompts, share_prompts=True, **kwargs)
        shared_positions, seen[:] = sum(seen), []
        apart = sample(small_vocab_model, None, prompts, share_prompts=False, **kwargs)
        apart_positions = sum(seen)
    finally:
        hook.remove()
    assert [s.completion_ids for s in shared] == [s.completion_ids for s in apart]
    assert [s.logp for s in shared] == pytest.approx([s.logp for s in apart], abs=1e-5)
    # each batch's rows are left-padded to its longest prompt, L; sharing encodes L - 1 positions once
    # per distinct prompt of a batch instead of once per row (then the last prompt token per row)
    batches = [list(range(9))[i : i + batch_size] for i in range(0, 9, batch_size)]
    saved = sum((len(b) - len({r // 3 for r in b})) * (max(len(prompts[r // 3]) for r in b) - 1) for b in batches)
    assert apart_positions - shared_positions == saved > 0


def test_completions_stop_at_the_eos_inclusive_and_cut_ones_keep_none(
    small_vocab_model: PreTrainedModel,
) -> None:
    samples = sample(
        small_vocab_model, None, [SHORT, LONG], 24, 5, seed=0, eos_token_id=EOS, pad_token_id=EOS
    )
    finished = [s for s in samples if s.finished]
    cut = [s for s in samples if not s.finished]
    assert finished and cut  # both kinds occur with an 8-token vocabulary
    for s in finished:
        assert s.completion_ids[-1] == EOS and s.completion_ids.count(EOS) == 1
        assert 1 <= len(s.completion_ids) <= 5
    for s in cut:
        assert len(s.completion_ids) == 5 and EOS not in s.completion_ids


def test_logp_agrees_with_a_separate_forward_with_and_without_left_padding(
    small_vocab_model: PreTrainedModel,
) -> None:
    kwargs = {"max_new_tokens": 6, "seed": 3, "eos_token_id": EOS, "pad_token_id": PAD}
    alone = sample(small_vocab_model, None, [SHORT], 8, **kwargs)
    padded = sample(small_vocab_model, None, [SHORT, LONG], 8, **kwargs)  # SHORT is left-padded by 5
    for samples in (alone, padded):
        forward = sequence_logps(small_vocab_model, samples)  # right-padded rows, no left padding
        diffs = [abs(s.logp - f) for s, f in zip(samples, forward)]
        assert max(diffs) < 1e-4


def test_temperature_changes_the_samples_but_logp_stays_under_the_raw_model(
    small_vocab_model: PreTrainedModel,
) -> None:
    samples = sample(
        small_vocab_model, None, [SHORT], 8, 6, temperature=0.5, top_p=0.8, seed=0, eos_token_id=EOS
    )
    forward = sequence_logps(small_vocab_model, samples)
    assert max(abs(s.logp - f) for s, f in zip(samples, forward)) < 1e-4


def test_the_models_own_generation_config_does_not_leak_into_sampling(
    small_vocab_model: PreTrainedModel,
) -> None:
    config = small_vocab_model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens = 1.5, 2, 3
    try:
        ids, mask, _ = pad_rows([SHORT, LONG], PAD, left=True)
        kwargs = generate_kwargs(6, 1.0, 1.0, 0, EOS, PAD)
        with torch.no_grad():
            out = small_vocab_model.generate(input_ids=ids, attention_mask=mask, output_scores=True, output_logits=True, **kwargs)
        for scores, logits in zip(out.scores, out.logits):  # processed == raw: nothing was applied
            torch.testing.assert_close(scores, logits, rtol=0, atol=0)
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens = 1.0, 0, None


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0], ids=["t1", "t0.7", "greedy"])
def test_logps_taken_step_by_step_equal_those_of_generates_stored_logits(small_vocab_model, temperature) -> None:
    """sample() keeps no step's logits beyond the next (StepLogps); the samples and their
    temperature-1 logp are those that generate's ``output_logits`` (every step's, kept) gives."""
    from dpo_lit.logps import selective_log_softmax

    prompts = [SHORT, LONG, [3, 4, 5]]
    ours = sample(small_vocab_model, None, prompts, 2, 7, temperature=temperature, seed=5, eos_token_id=EOS, pad_token_id=PAD)
    rows = [p for p in prompts for _ in range(2)]
    ids, mask, _ = pad_rows(rows, PAD, left=True)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        out = small_vocab_model.generate(
            input_ids=ids, attention_mask=mask, output_logits=True, **generate_kwargs(7, temperature, 1.0, 0, EOS, PAD)
        )
    new = out.sequences[:, ids.shape[1] :]
    stored = torch.stack([selective_log_softmax(step, new[:, t]) for t, step in enumerate(out.logits)], dim=1)
    if temperature > 0:  # rows that stopped at an EOS (padded after it) and rows cut at 7 tokens
        assert any(s.finished for s in ours) and any(not s.finished for s in ours)
    for row, s in enumerate(ours):
        assert s.completion_ids == new[row, : len(s.completion_ids)].tolist()
        assert s.logp == pytest.approx(float(stored[row, : len(s.completion_ids)].sum()), abs=1e-6)


def test_eval_mode_inside_and_the_mode_restored_after(small_vocab_model: PreTrainedModel) -> None:
    small_vocab_model.train()
    try:
        sample(small_vocab_model, None, [SHORT], 1, 2, seed=0, eos_token_id=EOS)
        assert small_vocab_model.training
    finally:
        small_vocab_model.eval()


def test_text_is_the_completion_decoded_without_specials(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    model = load_model("tiny-random-llama")
    prompts = encode_prompts(tiny_tokenizer, ["Hi", "Tell me a story"])
    for s in sample(model, tiny_tokenizer, prompts, 2, 4, seed=0):
        assert s.text == tiny_tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert len(s.completion_ids) == 4 or s.finished


def test_encode_prompts_chat_and_plain(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    def decode(ids: list[int]) -> str:
        return tiny_tokenizer.decode(ids, skip_special_tokens=False)

    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    chat, chat_messages = encode_prompts(tiny_tokenizer, ["Hi", messages])
    assert decode(chat) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert decode(chat_messages).startswith("<s><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user")
    [plain] = encode_prompts(tiny_tokenizer, ["Hi"], chat=False)
    assert decode(plain) == "<s>Hi"
    [doubled] = encode_prompts(tiny_tokenizer, ["<s>Hi"], chat=False)
    assert doubled == plain
    with pytest.raises(ValueError, match="chat template"):
        encode_prompts(tiny_tokenizer, [messages], chat=False)


def test_read_prompts_from_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\nSecond prompt\n")
    assert read_prompts(txt) == ["First prompt", "Second prompt"]
    messages = [{"role": "user", "content": "Hi"}]
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt": messages}) + "\n")
    assert read_prompts(good) == ["Hello", messages]
    for bad_line, message in (({"prompt": " "}, "non-empty string"), ({"text": "x"}, "missing")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(bad_line) + "\n")
        with pytest.raises(DataError, match=rf"bad\.jsonl:2: field 'prompt': .*{message}"):
            read_prompts(bad)


@pytest.mark.slow
def test_smollm2_logp_matches_a_forward_and_text_round_trips() -> None:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    prompts = encode_prompts(tokenizer, ["Say hi.", "Write one short sentence about the sea, please."])
    samples = sample(model, tokenizer, prompts, 2, 12, seed=0)
    forward = sequence_logps(model, samples, pad_token_id=tokenizer.pad_token_id)
    assert max(abs(s.logp - f) for s, f in zip(samples, forward)) < 1e-4
    for s in samples:
        assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert s.finished == (s.completion_ids[-1] == tokenizer.eos_token_id)


def predict(out: Path, *options: str) -> subprocess.CompletedProcess:
    """``dpo-lit predict`` of the tiny generation config over 15 prompts, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DPO_LIT_THREADS": "1"}
    command = [sys.executable, "-m", "dpo_lit", "predict", "--config", "configs/generate/tiny.yaml",
               "--data.limit=15", "--data.batch_size=4", f"--output.path={out}", *options]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_predict_under_ddp_writes_every_pair_once_in_order(tmp_path: Path) -> None:
    """2 gloo processes sample each prompt as 1 process does (a prompt's samples depend on its
    index and the seed only), and rank 0 writes the pairs of all 15 prompts, in prompt order."""
    one = predict(tmp_path / "one.jsonl")
    assert one.returncode == 0, one.stderr[-2000:]
    two = predict(tmp_path / "two.jsonl", "--trainer.strategy=ddp", "--trainer.devices=2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two.stdout + two.stderr
    rows = {n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").open()] for n in ("one", "two")}
    summary = {n: json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two")}
    assert summary["one"]["prompts"] == 15 and summary["one"]["samples"] == 60
    assert len(rows["one"]) == summary["one"]["pairs"] > 0
    assert rows["two"] == rows["one"]
    assert summary["two"] == summary["one"]
