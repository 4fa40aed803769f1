"""PreferenceModule with real tiny models and data: losses, configuration errors, LoRA export and
merge, LR schedules, the model card (the references: test_reference.py)."""

import json

import pytest
import torch
from conftest import ROOT, adam, fit_steps, tiny_data

from dpo_lit.callbacks import ExportPretrained
from dpo_lit.errors import ConfigError
from dpo_lit.losses import DPOLoss, KTOLoss
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.module import PreferenceModule
from dpo_lit.policy import LoRASettings


def test_kto_first_step_is_one_half_with_zero_rewards(tmp_path):
    """Before the first update the policy is the reference, so r = log π - log π_ref = 0 for every
    row and the mismatched rows give policy_kl = ref_kl, z0 = max(0, 0) = 0: each loss is
    1 - σ(β·(0 - 0)) = 0.5 (λ_D = λ_U = 1) and every reward β·r is 0."""
    module = PreferenceModule(TINY_ALIAS, loss=KTOLoss(beta=0.1), reference="copy", optimizer=adam())
    trainer = fit_steps(module, tiny_data(mode="unpaired"), tmp_path, steps=1, limit_val_batches=1)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], torch.tensor(0.5))
    # a shuffled batch of 4 may hold only desirable or only undesirable rows: check those it has
    names = ["kto_z0"] + [n for n in ("rewards/chosen", "rewards/rejected") if f"train/{n}" in metrics]
    assert len(names) > 1
    for name in names:  # float32 rounding of sums near -700
        torch.testing.assert_close(metrics[f"train/{name}"], torch.tensor(0.0), atol=1e-5, rtol=0)
    assert "train/rewards/margins" not in metrics  # KTO has no pairs to take margins of
    assert {"val/loss", "val/kto_z0", "val/rewards/chosen", "val/rewards/rejected"} <= set(metrics)


def test_configuration_mistakes_are_clear_errors():
    with pytest.raises(ValueError, match="needs a reference model"):
        PreferenceModule(TINY_ALIAS, loss=DPOLoss(), reference="none")
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        PreferenceModule(TINY_ALIAS, reference="adapter")
    with pytest.raises(ValueError, match="paired losses only"):
        PreferenceModule(TINY_ALIAS, loss=KTOLoss(), reference="precomputed")


def test_lora_export_and_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    module = PreferenceModule(TINY_ALIAS, reference="adapter", lora=LoRASettings(r=4, alpha=8), optimizer=adam(1e-2))
    trainer = fit_steps(module, tiny_data(), tmp_path, steps=3, callbacks=[ExportPretrained(merge=True)])
    run = ExportPretrained.run_dir(trainer)
    assert (run / "policy" / "adapter_config.json").is_file() and (run / "policy" / "tokenizer.json").is_file()
    # the adapter names its base as the run did (portable), not this machine's cache folder; the
    # policy in memory keeps the folder it was loaded from
    assert json.loads((run / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_ALIAS
    assert module.policy.peft_config["default"].base_model_name_or_path != TINY_ALIAS
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    adapter = load_model(str(run / "policy"))  # the base by its alias, the adapter attached
    ids = torch.tensor([[256, 72, 105, 33]])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module.policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.eval()(ids).logits, module.policy(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_lr_schedule_is_chosen_by_name(tmp_path):
    """transformers' schedules: linear warm-up from 0 over 10% of the steps, then linear decay to 0."""
    module = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam(1e-3), scheduler="linear", warmup_ratio=0.2)
    trainer = fit_steps(module, tiny_data(), tmp_path, steps=10)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # after the last of 10 steps
    assert [scheduler.lr_lambdas[0](step) for step in (0, 1, 2, 6)] == pytest.approx([0.0, 0.5, 1.0, 0.5])
    cosine = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam(), scheduler="cosine", warmup_ratio=0.0)
    trainer = fit_steps(cosine, tiny_data(), tmp_path, steps=4)
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0](2) == pytest.approx(0.5)


def test_unknown_lr_schedule_names_the_key(tmp_path):
    module = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam(), scheduler="linaer")
    with pytest.raises(ConfigError, match="model.scheduler"):
        fit_steps(module, tiny_data(), tmp_path, steps=1)


# ---- TR-DPO: the synced reference -----------------------------------------------------------------


def test_the_export_carries_a_model_card_and_an_offline_push_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """README.md beside the weights: base model, method with the loss's arguments, reference, data,
    steps and the final validation metrics; --export.push_to_hub without the network is one line and
    exit 2, the export kept."""
    from dpo_lit.cli import main as console_main

    root = ROOT
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", [
        "dpo-lit", "fit", "--config", "configs/dpo/tiny.yaml", "--model.loss.beta=0.3", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--export.push_to_hub=someone/tiny-dpo",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpo-lit: error: export.push_to_hub: uploading ") and "someone/tiny-dpo failed" in err[-1]
    card = (tmp_path / "lightning_logs" / "version_0" / "policy" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-random-llama\nlibrary_name: transformers\n")
    assert "loss DPOLoss(beta=0.3, label_smoothing=0.0)" in card and "reference: CopyReference" in card
    assert "data: dpo_lit/assets/tiny_pairs.jsonl (48 training examples)" in card and "2 optimizer steps" in card
    assert "| val/loss | " in card and "| val/rewards/accuracies | " in card
