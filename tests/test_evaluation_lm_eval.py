"""dpo_lit's multiple-choice scorer against lm-evaluation-harness itself, offline, on SmolLM2.

lm-eval (the ``evalcheck`` extra) runs its own ``arc_easy`` task config, pointed at a local
JSON-lines copy of the same seeded ARC-Easy subset, with its ``HFLM`` model class loading the
converted SmolLM2 folder. Both sides must pick the same answer on every item, by raw and by
length-normalised log-likelihood.
"""

import json
import random
from pathlib import Path

import pytest
import torch

from dpo_lit.evaluation import load_task, score_choices
from dpo_lit.evaluation.multiple_choice import encode_pair, mc_metrics
from dpo_lit.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve

ITEMS, SEED = 50, 0


def write_hub_layout(source: Path, out: Path, keep: list[int]) -> None:
    """The kept rows of the local ARC file in the Hub's ``allenai/ai2_arc`` layout, which lm-eval's
    ``arc_easy`` templates read (``question`` a string, ``choices`` {text, label})."""
    rows = source.read_text(encoding="utf-8").splitlines()
    with out.open("w", encoding="utf-8") as f:
        for i in keep:
            row = json.loads(rows[i])
            choices = row["question"]["choices"]
            hub_row = {
                "question": row["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": row["answerKey"],
            }
            f.write(json.dumps(hub_row) + "\n")


def local_task_config(lm_eval, data_file: Path, out_dir: Path) -> str:
    """lm-eval's own ``arc_easy.yaml``, reading ``data_file`` instead of the Hub; returns the task name."""
    import yaml

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml").read_text())
    for key in ("tag", "training_split", "validation_split"):
        config.pop(key, None)
    config.update(
        task="arc_easy_local",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"test": str(data_file)}},
    )
    (out_dir / "arc_easy_local.yaml").write_text(yaml.safe_dump(config))
    return config["task"]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, as numpy's


@pytest.mark.slow
def test_arc_easy_choices_match_lm_eval(shared_data, tmp_path, monkeypatch, eval_mirror):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    source = shared_data / "eval" / "ARC-Easy-Test.jsonl"
    n_rows = sum(1 for line in source.open() if line.strip())
    keep = sorted(random.Random(SEED).sample(range(n_rows), ITEMS))  # load_task's subset
    write_hub_layout(source, tmp_path / "arc_easy.jsonl", keep)
    task = local_task_config(lm_eval, tmp_path / "arc_easy.jsonl", tmp_path)

    eval_mirror(shared_data / "eval")
    items = load_task("arc_easy", limit=ITEMS, seed=SEED)
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    ours = score_choices(load_model(SMOLLM2_ALIAS), tokenizer, items, batch_size=16)

    model = HFLM(pretrained=resolve(SMOLLM2_ALIAS), device="cpu", dtype="float32", batch_size=16)
    for item in items:  # the same context/continuation token split (lm-eval's _encode_pair)
        for choice in item.choices:
            context, continuation = model._encode_pair(item.context, choice)
            assert (list(context), list(continuation)) == encode_pair(tokenizer, item.context, choice)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    lengths = [[len(text) for text in s["doc"]["choices"]["text"]] for s in samples]

    assert len(theirs) == ITEMS and [s["target"] for s in samples] == [item.answer for item in items]
    assert [len(ll) for ll in theirs] == [len(s) for s in ours]
    assert lengths == [[n for _, n in s] for s in ours]  # acc_norm divides by the same lengths
    assert [argmax([ll for ll, _ in s]) for s in ours] == [argmax(ll) for ll in theirs]
    assert [argmax([ll / n for ll, n in s]) for s in ours] == [
        argmax([ll / n for ll, n in zip(lls, ns)]) for lls, ns in zip(theirs, lengths)
    ]
    metrics, reported = mc_metrics(ours, [item.answer for item in items]), results["results"][task]
    assert metrics["acc"] == reported["acc,none"] and metrics["acc_norm"] == reported["acc_norm,none"]
    ours_ll = torch.tensor([ll for s in ours for ll, _ in s], dtype=torch.float64)
    theirs_ll = torch.tensor([ll for lls in theirs for ll in lls], dtype=torch.float64)
    delta = (ours_ll - theirs_ll).abs().max().item()
    print(f"ARC-Easy {ITEMS} items: dpo_lit {metrics}, lm-eval {reported}; max |Δ loglik| = {delta:.2e}")
    # Same tokens, both float32: only the arithmetic differs (dpo_lit takes a float32 logsumexp over
    # the scored positions, lm-eval a log_softmax of the whole sequence's logits). Measured: at most
    # 3.9e-4, at a log-likelihood of -56.5 where a float64 forward gives -56.53075, dpo_lit -56.53078
    # and lm-eval -56.53039. A token split off by one would differ by whole nats.
    torch.testing.assert_close(ours_ll, theirs_ll, rtol=2e-5, atol=1e-4)
