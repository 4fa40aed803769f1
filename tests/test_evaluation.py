"""Capability evaluation: exact scoring against direct forwards, adapters on real rows, the callback."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning import Trainer

import dpo_lit
from dpo_lit.callbacks.capability import CapabilityEval, relative_regression
from dpo_lit.data import DataError, PreferenceDataModule
from dpo_lit.evaluation import MCItem, evaluate_mc, mc_metrics, perplexity, score_choices
from dpo_lit.evaluation.multiple_choice import encode_pair, norm_length
from dpo_lit.evaluation.perplexity import windows
from dpo_lit.evaluation.tasks import hellaswag_context, load_task, load_text_task, wikitext_detokenize
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.module import PreferenceModule

ASSETS = Path(dpo_lit.__file__).parent / "assets"


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(TINY_ALIAS)


def direct_logp(model, ids: list[int], first_scored: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= first_scored, from a plain full-vocabulary forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # (T-1,)
    return logps[first_scored - 1 :].sum().item()


def logps_of(scores: list[list[tuple[float, int]]]) -> torch.Tensor:
    return torch.tensor([logp for item_scores in scores for logp, _ in item_scores])


# ---- multiple choice --------------------------------------------------------------------------


def test_encode_pair_moves_trailing_space_and_prefixes_bos(tiny_tokenizer, smol_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    context, continuation = encode_pair(tiny_tokenizer, "Answer: ", "yes", prefix=[bos])
    assert context[0] == bos and tiny_tokenizer.decode(context[1:]) == "Answer:"
    assert tiny_tokenizer.decode(continuation) == " yes"
    assert encode_pair(tiny_tokenizer, "", " a", prefix=[])[0] == [bos]  # empty context: the BOS conditions
    context, continuation = encode_pair(smol_tokenizer, "Question: capital of France?\nAnswer:", " Paris")
    assert smol_tokenizer.decode(continuation) == " Paris"
    assert smol_tokenizer.decode(context + continuation) == "Question: capital of France?\nAnswer: Paris"


def test_score_choices_equals_direct_forward(tiny_model, tiny_tokenizer):
    items = [
        MCItem("Question: is the sky blue?\nAnswer:", [" yes", " no", " it depends on the weather"], 0),
        MCItem("The end ", ["of it", "game"], 1),  # trailing space moves to the continuation
        MCItem("", [" first", " second words"], 0),  # empty context: BOS conditions the choice
    ]
    scores = score_choices(tiny_model, tiny_tokenizer, items, batch_size=3)
    bos = [tiny_tokenizer.bos_token_id]
    for item, item_scores in zip(items, scores):
        for choice, (logp, _) in zip(item.choices, item_scores):
            context, continuation = encode_pair(tiny_tokenizer, item.context, choice, bos)
            assert math.isclose(
                logp, direct_logp(tiny_model, context + continuation, len(context)), rel_tol=1e-5
            )
    assert [[length for _, length in s] for s in scores] == [[3, 2, 25], [5, 4], [5, 12]]  # no leading space
    one_by_one = score_choices(tiny_model, tiny_tokenizer, items, batch_size=1)  # padding changes nothing
    torch.testing.assert_close(logps_of(one_by_one), logps_of(scores))


def test_length_normalisation_flips_the_decision():
    # choice 0: -6 over 2 chars = -3 per char; choice 1: -8 over 8 chars = -1 per char.
    scores = [[(-6.0, 2), (-8.0, 8)], [(-1.0, 4), (-2.0, 4)]]
    assert mc_metrics(scores, [1, 0]) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}
    assert mc_metrics([[(-1.0, 1), (-1.0, 1)]], [0])["acc"] == 1.0  # ties go to the first choice
    assert norm_length(" yes") == 3 and norm_length("yes") == 3  # the delimiter space is not counted


def test_a_trained_continuation_wins(tiny_tokenizer):
    model = load_model(TINY_ALIAS)
    context, answer = "Q: what colour is the sky?\nA:", " blue"
    ids = tiny_tokenizer(context + answer, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.train()
    items = [MCItem(context, [" green", " blue", " red"], 1), MCItem(context, [" blue", " grey"], 0)]
    assert evaluate_mc(model, tiny_tokenizer, items) == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    assert model.training and all(m.training for m in model.modules())  # modes restored


# ---- perplexity -------------------------------------------------------------------------------


def test_windows_score_every_token_but_the_first_once():
    ids = list(range(100, 137))
    for prefix in ([], [1]):
        rows = windows(ids, context_length=8, prefix=prefix)
        scored = [t for row in rows for t in row.ids[row.first_scored :]]
        assert scored == ids[1:]
        assert all(len(row.ids) <= 8 and row.ids[: len(prefix)] == prefix for row in rows)


def test_perplexity_equals_exp_mean_nll(tiny_model, tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tiny_tokenizer.bos_token_id
    tiny_model.train()
    result = perplexity(tiny_model, tiny_tokenizer, text, context_length=512)  # one window
    nll = -direct_logp(tiny_model, [bos, *ids], 2) / (len(ids) - 1)
    assert result.tokens == len(ids) - 1
    assert math.isclose(result.nll, nll, rel_tol=1e-5) and math.isclose(
        result.ppl, math.exp(nll), rel_tol=1e-5
    )
    assert math.isclose(
        result.bits_per_byte, nll * (len(ids) - 1) / len(text.encode()) / math.log(2), rel_tol=1e-5
    )
    windowed = perplexity(tiny_model, tiny_tokenizer, text, max_tokens=60, context_length=16, batch_size=3)
    total = sum(-direct_logp(tiny_model, row.ids, row.first_scored) for row in windows(ids[:60], 16, [bos]))
    assert windowed.tokens == 59 and math.isclose(windowed.nll, total / 59, rel_tol=1e-5)
    assert tiny_model.training  # restored


# ---- tasks on the real files ------------------------------------------------------------------

FIRST_PROMPTS = {  # task: (items, choices of the first item, its prompt)
    "arc_easy": (
        2376,
        4,
        "Question: Which statement best explains why photosynthesis is the foundation of most food",
    ),
    "arc_challenge": (
        1172,
        4,
        "Question: An astronomer observes that a planet rotates faster after a meteorite",
    ),
    "piqa": (1838, 2, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"),
    "hellaswag": (10042, 4, "Roof shingle removal: A man is sitting on a roof. He"),
}
ARC_ENDINGS = {
    "arc_easy": " webs?\nAnswer:",
    "arc_challenge": " impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
}


@pytest.mark.parametrize("task", sorted(FIRST_PROMPTS))
def test_adapter_on_real_rows(task, shared_data, monkeypatch, eval_mirror):
    eval_mirror(shared_data / "eval")
    count, n_choices, prompt = FIRST_PROMPTS[task]
    items = load_task(task)
    assert len(items) == count and items[0].context == prompt + ARC_ENDINGS.get(task, "")
    assert all(0 <= item.answer < len(item.choices) for item in items)
    assert all(choice.startswith(" ") for item in items for choice in item.choices)
    assert max(len(item.choices) for item in items) <= 5 and len(items[0].choices) == n_choices


def test_adapter_details_on_real_rows(shared_data, monkeypatch, eval_mirror):
    eval_mirror(shared_data / "eval")
    arc = load_task("arc_easy")
    assert (
        arc[0].choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
        and arc[0].answer == 0
    )
    rows = (shared_data / "eval" / "ARC-Easy-Test.jsonl").read_text().splitlines()
    digit = next(i for i, row in enumerate(rows) if json.loads(row)["answerKey"].isdigit())
    assert arc[digit].answer == int(json.loads(rows[digit])["answerKey"]) - 1  # labels "1".."4"
    piqa = load_task("piqa")
    assert [item.answer for item in piqa[:3]] == [0, 1, 1]  # piqa_valid-labels.lst
    boolq = load_task("boolq")
    assert len(boolq) == 3270 and boolq[0].choices == [" no", " yes"] and boolq[0].answer == 0
    assert boolq[0].context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    hellaswag = load_task("hellaswag")
    assert hellaswag[0].choices[3] == " starts pulling up roofing on a roof." and hellaswag[0].answer == 3
    text = load_text_task("wikitext")
    assert text.startswith(
        " = Robert Boulter =\nRobert Boulter is an English film, television and theatre actor."
    )
    assert " @-@ " not in text
    subset = load_task("arc_easy", limit=10, seed=1)
    assert subset == load_task("arc_easy", limit=10, seed=1) != load_task("arc_easy", limit=10, seed=2)
    assert len(subset) == 10 and all(item in arc for item in subset)


def test_text_cleanups():
    assert wikitext_detokenize("a @-@ b , c ( d ) 1 @,@ 000") == "a-b, c (d) 1,000"
    assert (
        hellaswag_context("Clean and jerk: A lady walks. the lady")
        == "Clean and jerk: A lady walks. The lady"
    )
    assert hellaswag_context("How to x. Do y [header] now.") == "How to x. Do y now."


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_bad_rows_name_file_line_and_field(tmp_path, monkeypatch, eval_mirror):
    good = {"context": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}
    path = write_jsonl(tmp_path / "toy.jsonl", [good, {**good, "answer": 2}])
    with pytest.raises(DataError, match=r"toy\.jsonl:2: answer 2 is not the index"):
        load_task(str(path))
    write_jsonl(path, [good, "", {**good, "choices": "4"}])
    with pytest.raises(DataError, match=r"toy\.jsonl:3: field 'choices'"):
        load_task(str(path))
    write_jsonl(path, ["{not json"])
    with pytest.raises(DataError, match=r"toy\.jsonl:1: malformed JSON"):
        load_task(str(path))
    arc = {"question": {"stem": "?", "choices": [{"label": "A", "text": "x"}]}, "answerKey": "B"}
    write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [arc])
    eval_mirror(tmp_path)
    with pytest.raises(DataError, match=r"ARC-Easy-Test\.jsonl:1: field 'answerKey'"):
        load_task("arc_easy")
    write_jsonl(tmp_path / "piqa_valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "piqa_valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match="1 labels for the 2 rows"):
        load_task("piqa")
    with pytest.raises(DataError, match=r"google/boolq.*DPO_LIT_DATA=.* has no eval/boolq_dev\.jsonl"):
        load_task("boolq")
    with pytest.raises(ValueError, match="unknown evaluation task"):
        load_task("mmlu")


# ---- the callback -----------------------------------------------------------------------------


def make_data() -> PreferenceDataModule:
    return PreferenceDataModule(
        tokenizer_name=TINY_ALIAS,
        train_files=[str(ASSETS / "tiny_pairs.jsonl")],
        val_files=[str(ASSETS / "tiny_pairs_val.jsonl")],
        batch_size=4,
        max_length=256,
        max_prompt_length=128,
    )


def make_trainer(tmp_path, callback, steps: int = 2) -> Trainer:
    return Trainer(
        max_steps=steps,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


@pytest.fixture
def eval_files(tmp_path, monkeypatch, eval_mirror) -> str:
    """A small wiki.test.raw in a data folder of its own, and a generic JSONL task; returns its path."""
    eval_mirror(tmp_path)
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n A text @-@ like WikiText , with words . \n" * 8)
    rows = [
        {"context": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 2} or so"], "answer": 0} for i in range(6)
    ]
    return str(write_jsonl(tmp_path / "toy.jsonl", rows))


def capability(toy: str, **kwargs) -> CapabilityEval:
    return CapabilityEval(
        tasks=["wikitext", toy], limit=4, perplexity_tokens=64, context_length=32, batch_size=8, **kwargs
    )


def test_callback_logs_every_metric(tmp_path, eval_files):
    callback = capability(eval_files)
    module = PreferenceModule(TINY_ALIAS, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(module, datamodule=make_data())
    metrics = {"toy": ["acc", "acc_norm"], "wikitext": ["ppl", "word_ppl", "bits_per_byte"]}
    names = [f"cap/{t}/{m}{s}" for t, ms in metrics.items() for m in ms for s in ("", "_delta", "_ref")]
    assert set(names) | {"cap/seconds"} <= set(trainer.callback_metrics)
    row = next(r for r in callback.table if (r.task, r.metric) == ("wikitext", "ppl"))
    assert row.policy != row.reference  # two steps at lr 1e-2 moved the policy
    assert math.isclose(trainer.callback_metrics["cap/wikitext/ppl_delta"].item(), row.delta, rel_tol=1e-5)
    assert "wikitext" in callback.format_table()
    restored = CapabilityEval()
    restored.load_state_dict(callback.state_dict())
    assert restored.reference == callback.reference


def test_callback_scores_a_text_file_and_lambada(tmp_path, monkeypatch, eval_mirror):
    data = tmp_path / "eval"
    data.mkdir()
    eval_mirror(data)
    passages = ["the cat sat on the mat by the door", "she gave the book back to tom", "it rained all day"]
    (data / "lambada_test_plain_text.txt").write_text("\n".join(passages) + "\n")
    text = tmp_path / "heldout_text.txt"
    text.write_text("Some held-out prose, with a few words in it. " * 4, encoding="utf-8")
    callback = CapabilityEval(tasks=[str(text), "lambada"], limit=2, perplexity_tokens=64, context_length=32)
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(
        PreferenceModule(TINY_ALIAS, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)),
        datamodule=make_data(),
    )
    assert {
        "cap/heldout_text/ppl",
        "cap/heldout_text/ppl_delta",
        "cap/lambada/acc",
        "cap/lambada/ppl",
    } <= set(trainer.callback_metrics)
    assert len(callback._data["lambada"].data) == 2  # limit applies to LAMBADA's passages
    lambada_ppl = next(r for r in callback.table if (r.task, r.metric) == ("lambada", "ppl"))
    assert lambada_ppl.policy != lambada_ppl.reference and lambada_ppl.policy > 1


def test_validate_alone_scores_the_reference_and_gives_zero_deltas(tmp_path, eval_files):
    callback = capability(eval_files)
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(PreferenceModule(TINY_ALIAS), datamodule=make_data(), verbose=False)
    assert callback.table and all(row.delta == 0 for row in callback.table)


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_regression_beyond_threshold_warns_or_stops(tmp_path, eval_files, action):
    # max_regression=-1: "worse by more than -100%" holds for any finite perplexity.
    callback = capability(eval_files, max_regression=-1.0, on_regression=action)
    trainer = make_trainer(tmp_path, callback, steps=4)
    with pytest.warns(UserWarning, match=r"wikitext/ppl regressed"):
        trainer.fit(PreferenceModule(TINY_ALIAS), datamodule=make_data())
    assert trainer.global_step == (2 if action == "stop" else 4)


def test_relative_regression_directions():
    assert relative_regression("acc", 0.5, 0.4) == pytest.approx(0.2)  # accuracy dropped by 20%
    assert relative_regression("ppl", 20.0, 25.0) == pytest.approx(0.25)  # perplexity rose by 25%
    assert relative_regression("ppl", 20.0, 15.0) < 0


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_capabilities(shared_data, monkeypatch, eval_mirror):
    eval_mirror(shared_data / "eval")
    from dpo_lit.models import SMOLLM2_ALIAS, load_tokenizer

    model, tokenizer = load_model(SMOLLM2_ALIAS), load_tokenizer(SMOLLM2_ALIAS)
    arc = evaluate_mc(model, tokenizer, load_task("arc_easy", limit=40))
    piqa = evaluate_mc(model, tokenizer, load_task("piqa", limit=40))
    wiki = perplexity(model, tokenizer, load_text_task("wikitext"), max_tokens=2048)
    print(f"ARC-Easy {arc}, PIQA {piqa}, WikiText-2 {wiki}")
    assert all(0 <= r[k] <= 1 for r in (arc, piqa) for k in ("acc", "acc_norm"))
    # Measured (CPU, float32): PIQA 0.875 (chance 0.5; a guesser reaches 0.7 with p < 1%).
    # ARC-Easy 0.30 on these 40 items (0.45 on 200): 40 items cannot tell it from chance (0.25).
    assert piqa["acc"] >= 0.7 and arc["acc"] >= 0.25
    assert 15 < wiki.ppl < 40 and wiki.tokens == 2047  # measured 25.0
