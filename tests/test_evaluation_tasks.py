"""Tasks given as text files, LAMBADA, and the one-call evaluation, against direct computations."""

import math

import pytest
import torch

from dpo_lit.data import DataError
from dpo_lit.evaluation import evaluate_task, load_task, load_task_data, load_text_task
from dpo_lit.evaluation.lambada import LambadaItem, lambada_metrics, score_targets
from dpo_lit.evaluation.scoring import Row, RowScore, evaluating, score_rows
from dpo_lit.evaluation.tasks import task_kind, task_name, task_source
from dpo_lit.models import TINY_ALIAS, load_model


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(TINY_ALIAS)


def token_logps(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[t] | ids[:t]) and whether ids[t] is the argmax, for t >= 1, from a plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()  # (T-1, V)
    targets = torch.tensor(ids[1:])  # (T-1,)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]  # (T-1,)
    return logps, logits.argmax(-1) == targets


# ---- a .txt file is a perplexity task -----------------------------------------------------------

TEXT = "Held-out notes: the café opened at nine, and the ß in Straße is one letter.\n" * 3


def test_txt_task_is_named_after_its_stem_and_read_as_utf8(tmp_path):
    path = tmp_path / "heldout_text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert task_kind(str(path)) == "text" and task_name(str(path)) == "heldout_text"
    assert load_text_task(str(path)) == TEXT
    data = load_task_data(str(path), limit=1)  # limit: items only, a text is whole
    assert (data.name, data.kind, data.data) == ("heldout_text", "text", TEXT)
    with pytest.raises(ValueError, match="perplexity task"):
        load_task(str(path))
    with pytest.raises(FileNotFoundError, match=r"heldout_missing\.txt"):
        load_task_data(str(tmp_path / "heldout_missing.txt"))
    with pytest.raises(ValueError, match=r"a \.jsonl or a \.txt file"):
        task_source(str(tmp_path / "notes.csv"))


def test_txt_task_perplexity_equals_direct_computation(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "heldout_text.txt"
    path.write_text(TEXT, encoding="utf-8")
    metrics = evaluate_task(tiny_model, tiny_tokenizer, load_task_data(str(path)), context_length=1024)
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    logps, _ = token_logps(tiny_model, [tiny_tokenizer.bos_token_id, *ids])  # one window, BOS first
    nll = -logps[1:].sum().item()  # the text's first token is context only
    assert set(metrics) == {"ppl", "word_ppl", "bits_per_byte"}
    assert math.isclose(metrics["ppl"], math.exp(nll / (len(ids) - 1)), rel_tol=1e-5)
    assert math.isclose(metrics["word_ppl"], math.exp(nll / len(TEXT.split())), rel_tol=1e-5)
    assert math.isclose(metrics["bits_per_byte"], nll / len(TEXT.encode("utf-8")) / math.log(2), rel_tol=1e-5)


# ---- LAMBADA ----------------------------------------------------------------------------------

PASSAGES = [
    "the cat sat on the mat , and the dog slept by the door",
    "`` give it back , '' she said to her brother tom",
    "the children ran out to play",
]


def lambada_dir(tmp_path, monkeypatch, passages=PASSAGES):
    monkeypatch.setenv("DPO_LIT_DATA", str(tmp_path))  # a local mirror holding only eval/'s LAMBADA
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "lambada_test_plain_text.txt").write_text("\n".join(passages) + "\n\n", encoding="utf-8")
    return tmp_path


def by_hand(model, tokenizer, passage: str) -> tuple[float, bool]:
    """lm-eval's recipe written out: split off the last word, encode the passage whole, the
    target's tokens are those after the context's own; score them with a plain forward."""
    words = passage.split(" ")
    context = " ".join(words[:-1])
    whole = tokenizer(passage, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    logps, hits = token_logps(model, [tokenizer.bos_token_id, *whole])
    target = slice(n_context, len(whole))  # position t-1 predicts token t of [bos, *whole]
    return logps[target].sum().item(), bool(hits[target].all())


def test_lambada_items_follow_lm_eval_split(tmp_path, monkeypatch):
    lambada_dir(tmp_path, monkeypatch)
    items = load_task("lambada")
    assert items[0] == LambadaItem("the cat sat on the mat , and the dog slept by the", " door")
    assert items[1].target == " tom" and items[1].context.endswith("her brother")
    assert len(items) == 3 and load_task("lambada", limit=2, seed=0) == load_task("lambada", limit=2, seed=0)
    assert all(item in items for item in load_task("lambada", limit=2, seed=3))
    lambada_dir(tmp_path, monkeypatch, [PASSAGES[0], "alone"])
    with pytest.raises(DataError, match=r"lambada_test_plain_text\.txt:2: a passage needs a last word"):
        load_task("lambada")


def test_lambada_metrics_equal_hand_computation(tmp_path, monkeypatch, tiny_tokenizer):
    lambada_dir(tmp_path, monkeypatch)
    model = load_model(TINY_ALIAS)
    ids = tiny_tokenizer(PASSAGES[2], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(
        40
    ):  # memorise the third passage (20 steps suffice), so that greedy decoding finds its last word
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = [by_hand(model, tiny_tokenizer, passage) for passage in PASSAGES]
    assert [greedy for _, greedy in expected] == [False, False, True]

    scores = score_targets(model, tiny_tokenizer, load_task("lambada"), batch_size=2)
    torch.testing.assert_close(
        torch.tensor([s.logp for s in scores]),
        torch.tensor([logp for logp, _ in expected]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert [s.greedy for s in scores] == [greedy for _, greedy in expected]
    metrics = evaluate_task(model, tiny_tokenizer, load_task_data("lambada"), batch_size=3)
    assert set(metrics) == {"acc", "ppl"} and metrics["acc"] == pytest.approx(1 / 3)
    mean_logp = sum(logp for logp, _ in expected) / 3
    assert math.isclose(metrics["ppl"], math.exp(-mean_logp), rel_tol=1e-5)


def test_lambada_metrics_aggregate_per_passage():
    # ppl is exp(-mean over passages of the summed target log-likelihood), not a per-token mean.
    scores = [RowScore(-1.0, 1, True), RowScore(-5.0, 4, False)]
    assert lambada_metrics(scores) == {"acc": 0.5, "ppl": pytest.approx(math.exp(3.0)), "n": 2}
    with pytest.raises(ValueError, match="no items"):
        lambada_metrics([])


def test_score_rows_greedy_flag(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("a short row to decode", add_special_tokens=True)["input_ids"]
    _, hits = token_logps(tiny_model, ids)
    with torch.no_grad():
        greedy_next = int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax())
    other = (greedy_next + 1) % tiny_model.config.vocab_size
    rows = [Row([*ids, greedy_next], len(ids)), Row([*ids, other], len(ids)), Row(ids, 1)]
    with evaluating(tiny_model):
        scores = score_rows(tiny_model, rows, pad_id=0, batch_size=3)
    assert [s.greedy for s in scores] == [True, False, bool(hits.all())]
    assert [s.tokens for s in scores] == [1, 1, len(ids) - 1]


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_lambada(shared_data, monkeypatch, eval_mirror):
    eval_mirror(shared_data / "eval")
    from dpo_lit.models import SMOLLM2_ALIAS, load_tokenizer

    model, tokenizer = load_model(SMOLLM2_ALIAS), load_tokenizer(SMOLLM2_ALIAS)
    data = load_task_data("lambada", limit=100, seed=0)
    metrics = evaluate_task(model, tokenizer, data, batch_size=8)
    print(f"LAMBADA (original test text, 100 items, seed 0): {metrics}")
    # Measured (CPU, float32): acc 0.17, ppl 222 on these 100; acc 0.215, ppl 123 on 1000 (seed 0).
    # Lower than published lambada_openai numbers: this file is the original lower-case, tokenised
    # text. Guessing the exact word scores about 0; acc >= 0.08 is 2.3 standard errors below 0.17.
    assert 0.08 <= metrics["acc"] <= 0.4 and 50 < metrics["ppl"] < 1000
