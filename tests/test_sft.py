"""Supervised fine-tuning: which tokens carry the loss, bad records, the validation perplexity,
LoRA, and the tiny config through the CLI."""

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from lightning import Trainer

import dpo_lit
from dpo_lit.callbacks import ExportPretrained, SampleTable
from dpo_lit.callbacks.samples import NO_REFERENCE
from dpo_lit.cli import main, run
from dpo_lit.data import DataError, SFTDataModule
from dpo_lit.data.sft import SFTCollator
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.policy import LoRASettings
from dpo_lit.rlhf import SFTModule

ASSETS = Path(dpo_lit.__file__).parent / "assets"


def write_jsonl(path: Path, records: list[dict]) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def batch_of(path: str, **kwargs) -> tuple[dict[str, torch.Tensor], SFTDataModule]:
    """One batch of all the records of a file (nothing held out), in file order, and the data module."""
    data = SFTDataModule(TINY_ALIAS, [path], val_fraction=0.0, **kwargs)
    data.setup()
    examples = sorted(data.train_dataset, key=lambda e: int(e["source"].rpartition(":")[2]))  # setup shuffles
    return SFTCollator(data.tokenizer.pad_token_id)(examples), data


MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]
CHAT_PROMPT = (
    "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.parametrize(
    "record,prompt,completion",
    [
        ({"prompt": "Q: 2+2?", "completion": " 4"}, "<s>Q: 2+2?", " 4<|im_end|>"),
        ({"prompt": MESSAGES[:3], "completion": MESSAGES[3:]}, CHAT_PROMPT, "Fine.<|im_end|>"),
        ({"messages": MESSAGES}, CHAT_PROMPT, "Fine.<|im_end|>"),
        ({"text": "A fine film."}, "<s>", "A fine film.<|im_end|>"),
        ({"prompt": "Hi", "chosen": " Hello!", "rejected": " Go away."}, "<s>Hi", " Hello!<|im_end|>"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
            "<s>\n\nHuman: Hi\n\nAssistant:", " Hello!<|im_end|>",
        ),
    ],
    ids=["prompt-completion", "prompt-completion-chat", "messages", "text", "standard-pair", "implicit-pair"],
)  # fmt: skip
def test_the_loss_is_on_the_completion_only(tmp_path, record, prompt, completion):
    """Labelled tokens are the completion (the last assistant turn, the chosen answer, a whole text),
    closed by one EOS; the rest of the row is the prompt as the chat template or the tokenizer writes it."""
    batch, data = batch_of(write_jsonl(tmp_path / "data.jsonl", [record]))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    decode = data.tokenizer.decode
    assert decode(ids[labels == -100]) == prompt and decode(labels[labels != -100]) == completion
    assert torch.equal(labels[labels != -100], ids[labels != -100])


def test_labels_are_the_completion_ids_whatever_the_prompt(tmp_path):
    """A prompt token changed (same length) changes no label; the labels are -100 over the prompt and
    the padding and equal the completion's ids (closed by EOS) in between."""
    records = [
        {"prompt": "Say yes.", "completion": " Yes, gladly."},
        {"prompt": "Say yet.", "completion": " Yes, gladly."},
        {"prompt": "Say no.", "completion": " No."},
    ]
    batch, data = batch_of(write_jsonl(tmp_path / "data.jsonl", records))
    tokenizer = data.tokenizer
    assert (batch["input_ids"][0] != batch["input_ids"][1]).sum() == 1
    assert torch.equal(batch["labels"][0], batch["labels"][1])
    for row, record in enumerate(records):
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        completion.append(tokenizer.eos_token_id)
        padding = batch["labels"].shape[1] - len(prompt) - len(completion)
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + completion + [-100] * padding
        assert batch["attention_mask"][row].tolist() == [1] * (len(prompt) + len(completion)) + [0] * padding


def test_long_texts_are_cut_at_max_length_without_an_eos(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "x" * 100}])
    batch, data = batch_of(path, max_length=20, max_prompt_length=10)
    assert batch["input_ids"].shape == (1, 20) and data.tokenizer.eos_token_id not in batch["labels"][0]
    assert (batch["labels"][0, 1:] != -100).all()  # every token but the BOS


TEXT, CHAT, PAIR = {"text": "Fine."}, {"messages": MESSAGES}, {"prompt": "Hi", "chosen": "A", "rejected": "B"}
UNPAIRED = {"prompt": "Hi", "completion": "Hello"}


@pytest.mark.parametrize(
    "good,bad,reason",
    [
        (TEXT, {"text": 3}, "field 'text': expected a non-empty string, got int"),
        (TEXT, {"text": "  "}, "field 'text': expected a non-empty string, got an empty string"),
        (TEXT, {"review": "Fine."}, "field 'text': missing"),
        (CHAT, {"messages": MESSAGES[:3]}, "field 'messages[2].role': the last message"),
        (CHAT, {"messages": MESSAGES[3:]}, "field 'messages': no message before the assistant"),
        (UNPAIRED, {**UNPAIRED, "label": 0}, "field 'label': false"),
        (UNPAIRED, {**UNPAIRED, "completion": ["x"]}, "field 'completion[0]': expected a message object"),
        (PAIR, {**PAIR, "rejected": 3}, "field 'rejected': expected a non-empty string, got int"),
    ],
    ids=["text-type", "text-empty", "text-missing", "last-role", "no-prompt", "label", "completion", "pair"],
)  # fmt: skip
def test_a_bad_record_names_file_line_and_field(tmp_path, good, bad, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}:2: {reason}')}"):
        SFTDataModule(TINY_ALIAS, [path], val_fraction=0.0).setup()


def test_setup_says_what_data_it_read(tmp_path, caplog):
    """As the preference data module does: counts, source, validation, format and what was skipped
    or cut, in one line."""
    rows = [{"text": f"A review number {i}."} for i in range(9)] + [{"text": ""}, {"text": "word " * 100}]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    with caplog.at_level("INFO"):
        SFTDataModule(TINY_ALIAS, [path], val_fraction=0.1, max_length=64, max_prompt_length=None,
                      on_bad_record="skip").setup()  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert said == [
        f"data: 9 train and 1 validation SFT examples from {path} (validation: 0.1 of the training records); "
        "format text; 1 bad record(s) skipped, 0 example(s) dropped, 1 truncated to fit"
    ]


def test_gzipped_text_files_load(tmp_path):
    """IMDb's layout: gzipped JSON lines with id, rating, label and text; the text is trained on whole."""
    reviews = [{"id": i, "rating": 9, "label": 1, "text": f"Review {i}: a fine film."} for i in range(5)]
    batch, data = batch_of(write_jsonl(tmp_path / "reviews.jsonl.gz", reviews))
    texts = {data.tokenizer.decode(row[row != -100]) for row in batch["labels"]}
    assert texts == {f"Review {i}: a fine film.<|im_end|>" for i in range(5)}


def test_imdb_reviews_load(shared_data):
    imdb = str(shared_data / "sentiment" / "imdb_train.jsonl.gz")
    data = SFTDataModule(TINY_ALIAS, [imdb], max_examples=8, max_length=64, max_prompt_length=None)
    data.setup()
    assert len(data.train_dataset) == len(data.val_dataset) == 8
    example = data.train_dataset[0]
    assert example["source"].startswith(f"{imdb}:")
    assert example["prompt_ids"] == [data.tokenizer.bos_token_id] and len(example["completion_ids"]) == 63



def test_bad_data_ends_in_one_clear_line_through_the_cli(tmp_path, monkeypatch, capsys):
    bad = write_jsonl(tmp_path / "sft.jsonl", [UNPAIRED, {**UNPAIRED, "completion": 3}])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", [
        "dpo-lit", "fit", "--config", "configs/sft/tiny.yaml", f"--data.train_files=[{bad}]",
        f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"dpo-lit: error: {bad}:2: field 'completion': expected a non-empty string, got int" + (
        " (on_bad_record: skip counts and skips such records)"
    )


# ---- the module -------------------------------------------------------------------------------


def fit(module: SFTModule, data: SFTDataModule, tmp_path: Path, steps: int) -> Trainer:
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def tiny_pairs(**kwargs) -> SFTDataModule:
    return SFTDataModule(
        TINY_ALIAS, [str(ASSETS / "tiny_pairs.jsonl")], [str(ASSETS / "tiny_pairs_val.jsonl")], **kwargs
    )


def test_val_loss_is_the_token_mean_over_the_whole_validation_set():
    """Not a mean of batch means: the same number for any batch size, and the hand-computed
    -sum(log p(completion token)) / (number of completion tokens); val/ppl is its exponential."""
    module = SFTModule(TINY_ALIAS)
    results = []
    for eval_batch_size in (1, 5, 16):
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        results += trainer.validate(module, datamodule=tiny_pairs(eval_batch_size=eval_batch_size))
    data = tiny_pairs()
    data.setup()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in data.val_dataset:
            ids = torch.tensor([example["prompt_ids"] + example["completion_ids"]])
            logits = module.policy(input_ids=ids).logits[0, len(example["prompt_ids"]) - 1 : -1]  # (C, V)
            target = torch.tensor(example["completion_ids"])
            nll += F.cross_entropy(logits, target, reduction="sum").item()
            tokens += len(target)
    for result in results:
        assert result["val/loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert result["val/ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_the_packed_fused_loss_and_its_gradients_equal_the_models_own_cross_entropy():
    """forward_batch packs the rows and runs the head chunk by chunk; Hugging Face's padded
    ``model(labels=...)`` loss is the same number with the same gradients."""
    module = SFTModule(TINY_ALIAS)
    plain = SFTModule(TINY_ALIAS, fused_head=False)  # the model's own padded cross-entropy
    data = tiny_pairs(batch_size=5)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    params = list(module.policy.parameters())
    loss, tokens = module.forward_batch(batch)
    grads = torch.autograd.grad(loss, params)
    theirs = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    expected = torch.autograd.grad(theirs, params)
    assert int(tokens) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, theirs, rtol=0, atol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    plain_loss, plain_tokens = plain.forward_batch(batch)
    torch.testing.assert_close(plain_loss, theirs, rtol=0, atol=1e-6)
    assert int(plain_tokens) == int(tokens)
    for packing in ("rows", "none"):
        torch.testing.assert_close(SFTModule(TINY_ALIAS, packing=packing).forward_batch(batch)[0], theirs, rtol=0, atol=1e-5)


def test_lora_sft_trains_only_the_adapter(tmp_path):
    module = SFTModule(TINY_ALIAS, lora=LoRASettings(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, 1e-2))
    before = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
    fit(module, tiny_pairs(batch_size=4), tmp_path, steps=3)
    trainable = {name for name, p in module.policy.named_parameters() if p.requires_grad}
    changed = {name for name, p in module.policy.named_parameters() if not torch.equal(p, before[name])}
    assert trainable and all("lora_" in name for name in trainable)
    assert changed == {name for name in trainable if "lora_B" in name or "lora_A" in name} and changed


def test_sample_table_shows_the_policy_alone():
    """Callbacks that ask the module for its reference find none and carry on."""
    table = SampleTable(max_new_tokens=4)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[table])
    trainer.validate(SFTModule(TINY_ALIAS), datamodule=tiny_pairs())
    assert len(table.last_rows) == 3 and all(row.reference == NO_REFERENCE for row in table.last_rows)


def test_tiny_config_lowers_val_loss_and_exports_a_model_load_model_loads(tmp_path, monkeypatch):
    """configs/sft/tiny.yaml through the CLI: val/loss falls below the untrained model's (validate
    without a checkpoint), and the exported policy folder loads as the same model."""
    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/sft/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]  # fmt: skip
    initial = float(run(["validate", *common]).trainer.callback_metrics["val/loss"])
    fitted = run(["fit", *common])
    final = float(fitted.trainer.callback_metrics["val/loss"])
    assert type(fitted.model) is SFTModule and final < initial - 1.0, (initial, final)
    exported = load_model(str(ExportPretrained.run_dir(fitted.trainer) / "policy"))
    ids = torch.tensor([[256, 72, 105, 33]])
    fitted.model.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, fitted.model.policy(ids).logits)
