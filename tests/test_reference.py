"""The references (dpo_lit/reference.py) inside PreferenceModule: copy, adapter, precomputed, none and
synced (TR-DPO), each against the policy it stands for, in training, checkpoints and caches."""

import contextlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import adam, fit_steps, tiny_data
from lightning import Trainer

from dpo_lit.errors import ConfigError
from dpo_lit.logps import completion_logps
from dpo_lit.losses import DPOLoss, SimPOLoss
from dpo_lit.models import TINY_ALIAS, resolve
from dpo_lit.module import PreferenceModule
from dpo_lit.policy import LoRASettings
from dpo_lit.reference import CopyReference, NoReference, PrecomputedReference, SyncedReference


@pytest.mark.parametrize(
    "reference,lora",
    [("copy", None), ("adapter", LoRASettings(r=4, alpha=8)), ("precomputed", None)],
)
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tmp_path, monkeypatch, reference, lora):
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    module = PreferenceModule(TINY_ALIAS, loss=DPOLoss(beta=0.1), reference=reference, lora=lora, optimizer=adam())
    trainer = fit_steps(module, tiny_data(), tmp_path)  # metrics of step 1 are computed before the update
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], torch.tensor(math.log(2)))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        # float32 sums of ~100 token log-probs near -700, batched differently for the precomputed
        # table: 1e-5 in reward (1e-4 nats at beta 0.1) is rounding, not a difference of models
        torch.testing.assert_close(metrics[f"train/{name}"], torch.tensor(0.0), atol=1e-5, rtol=0)


def test_reference_is_frozen_and_unchanged_after_training(tmp_path):
    module = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam())
    reference, _ = module.reference.model(module.policy)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit_steps(module, tiny_data(), tmp_path, steps=4)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(changed) == len(policy_before)  # every policy tensor moved


def test_adapter_reference_keeps_base_weights(tmp_path):
    module = PreferenceModule(TINY_ALIAS, reference="adapter", lora=LoRASettings(r=4, alpha=8), optimizer=adam())
    state = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit_steps(module, tiny_data(), tmp_path, steps=3)
    for key, value in module.policy.state_dict().items():
        assert torch.equal(value, state[key]) == ("lora_" not in key), key


def test_reference_is_not_saved_in_checkpoints(tmp_path):
    module = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam())
    trainer = fit_steps(module, tiny_data(), tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    keys = torch.load(tmp_path / "run.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("policy.") for k in keys)
    assert isinstance(module.reference, CopyReference)


def test_precomputed_reference_matches_copy_covers_what_the_run_uses_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    data = tiny_data()
    module = PreferenceModule(TINY_ALIAS, reference="precomputed", optimizer=adam())
    fit_steps(module, data, tmp_path, steps=1, limit_val_batches=1)
    assert isinstance(module.reference, PrecomputedReference)
    files = list((tmp_path / "cache" / "ref_logps").glob("*.pt"))
    assert len(files) == 2  # train and val
    # one step of 4 pairs, one validation batch: only those examples were computed
    computed = {split: (~torch.isnan(t).any(-1)).nonzero().flatten().tolist() for split, t in module.reference.tables.items()}
    assert computed["train"] == data.train_indices(1) and len(computed["train"]) == 4 < len(data.train_dataset)
    assert computed["val"] == list(range(min(data.eval_batch_size, len(data.val_dataset))))
    copy = PreferenceModule(TINY_ALIAS, reference="copy")
    batch = next(iter(data.ordered_dataloader("train", computed["train"])))
    expected = copy.reference.logps(copy.policy, batch, "train")
    torch.testing.assert_close(module.reference.logps(module.policy, batch, "train"), expected)

    # a longer run reads those from the cache and computes only the examples it adds
    again = PreferenceModule(TINY_ALIAS, reference="precomputed", optimizer=adam())
    compute, sizes = again.reference._compute, []

    def counted(policy, loader, *args):
        sizes.append(len(loader.dataset))
        return compute(policy, loader, *args)

    monkeypatch.setattr(again.reference, "_compute", counted)
    data = tiny_data()
    fit_steps(again, data, tmp_path, steps=3, limit_val_batches=1)
    assert sizes == [len(set(data.train_indices(3)) - set(computed["train"]))]

    # a run that uses a batch it did not plan for stops (never a NaN reference)
    table = again.reference.tables["train"]
    table[data.train_indices(1)[0]] = float("nan")
    with pytest.raises(RuntimeError, match="without precomputed reference"):
        again.reference.logps(again.policy, next(iter(data.ordered_dataloader("train", data.train_indices(1)))), "train")


def test_reference_free_loss_uses_no_reference_and_matches_its_formula(tmp_path):
    """SimPO on the validation pairs, worked out here from the policy's own rows: a = summed
    log-prob / tokens, loss = softplus(-(β·a_c - β·a_r - γ)), rewards β·a. The module must give
    the mean of these over all 16 pairs without any reference model."""
    beta, gamma = 2.0, 0.5
    module = PreferenceModule(TINY_ALIAS, loss=SimPOLoss(beta=beta, gamma=gamma), reference="copy", optimizer=adam())
    assert type(module.reference) is NoReference
    data = tiny_data()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.validate(module, datamodule=data)
    module.policy.eval()
    a_c, a_r = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logps, tokens = completion_logps(
                module.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
            b = len(batch["index"])
            a_c.append(logps[:b] / tokens[:b])
            a_r.append(logps[b:] / tokens[b:])
    module.policy.train()
    a_c, a_r = torch.cat(a_c), torch.cat(a_r)
    assert len(a_c) == 16
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/loss"], F.softplus(-(beta * (a_c - a_r) - gamma)).mean())
    torch.testing.assert_close(metrics["val/rewards/chosen"], beta * a_c.mean())
    torch.testing.assert_close(metrics["val/rewards/margins"], beta * (a_c - a_r).mean())
    torch.testing.assert_close(metrics["val/rewards/accuracies"], (a_c > a_r).float().mean())
    assert torch.isfinite(fit_steps(module, data, tmp_path, steps=2).callback_metrics["train/loss"])


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_synced_reference_update_rule():
    """Every sync_steps optimizer steps: ref <- alpha * policy + (1 - alpha) * ref, and only then."""
    module = PreferenceModule(TINY_ALIAS, reference=SyncedReference(mixup_alpha=0.25, sync_steps=2), optimizer=adam())
    ref = module.reference
    before = _params(ref.frozen)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(1.0)
    policy = _params(module.policy)
    ref.after_step(module.policy, 1)  # not a multiple of sync_steps: untouched
    for name, value in _params(ref.frozen).items():
        torch.testing.assert_close(value, before[name])
    ref.after_step(module.policy, 2)
    for name, value in _params(ref.frozen).items():
        torch.testing.assert_close(value, 0.25 * policy[name] + 0.75 * before[name])
    synced = _params(ref.frozen)
    ref.after_step(module.policy, 2)  # the same step again (gradient accumulation): no second update
    for name, value in _params(ref.frozen).items():
        torch.testing.assert_close(value, synced[name])
    hard = PreferenceModule(TINY_ALIAS, reference=SyncedReference(mixup_alpha=1.0, sync_steps=1))
    with torch.no_grad():
        next(hard.policy.parameters()).mul_(3.0)
    hard.reference.after_step(hard.policy, 1)
    for name, value in _params(hard.reference.frozen).items():
        torch.testing.assert_close(value, _params(hard.policy)[name], rtol=0, atol=0)


def test_synced_reference_moves_in_training_and_resumes_from_checkpoint(tmp_path):
    module = PreferenceModule(TINY_ALIAS, reference=SyncedReference(mixup_alpha=0.5, sync_steps=2), optimizer=adam(1e-2))
    initial = _params(module.reference.frozen)
    trainer = fit_steps(module, tiny_data(), tmp_path, steps=4)
    moved = _params(module.reference.frozen)
    assert any(not torch.equal(moved[n], initial[n]) for n in initial)
    assert module.reference.last_step == 4
    ckpt = tmp_path / "synced.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = PreferenceModule(TINY_ALIAS, reference=SyncedReference(mixup_alpha=0.5, sync_steps=2), optimizer=adam(1e-2))
    resumed.on_load_checkpoint(torch.load(ckpt, weights_only=False))
    for name, value in _params(resumed.reference.frozen).items():
        torch.testing.assert_close(value, moved[name], rtol=0, atol=0)
    assert resumed.reference.last_step == 4


def test_other_references_are_not_synced(tmp_path):
    copy = PreferenceModule(TINY_ALIAS, reference="copy", optimizer=adam(1e-2))
    initial = _params(copy.reference.frozen)
    fit_steps(copy, tiny_data(), tmp_path, steps=4)
    for name, value in _params(copy.reference.frozen).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    assert copy.reference.state_dict() == {}


def test_synced_reference_configuration_errors():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        SyncedReference(mixup_alpha=0.0)
    with pytest.raises(ConfigError, match="sync_steps"):
        SyncedReference(sync_steps=0)
    with pytest.raises(ConfigError, match="full fine-tuning"):
        PreferenceModule(TINY_ALIAS, reference=SyncedReference(), lora=LoRASettings(r=4, alpha=8))


def test_precomputed_cache_is_keyed_by_precision(tmp_path, monkeypatch):
    """A table computed under bf16 autocast must never be read by a float32 run (or the reverse)."""
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    module = PreferenceModule(TINY_ALIAS, reference="precomputed", optimizer=adam())
    data = tiny_data()
    data.setup("fit")
    key = module.reference._key
    assert key(data.train_dataset, "32-true") != key(data.train_dataset, "bf16-mixed")
    assert key(data.train_dataset, "32-true") == key(data.train_dataset, "32-true")


def test_precomputed_cache_key_includes_the_model_config(tmp_path, monkeypatch):
    """The same weights under a changed config.json (another RoPE base) compute other log-probs:
    they must get their own cache file, never the stale values of the first config."""
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other-rope"
    shutil.copytree(resolve(TINY_ALIAS), other)
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 100.0
    (other / "config.json").write_text(json.dumps(config))
    data = tiny_data()
    data.setup("fit")
    split = {"train": (data.train_dataset, lambda indices: data.ordered_dataloader("train", indices), [0, 1, 2, 3])}
    tables, paths = [], []
    for name in (TINY_ALIAS, str(other)):
        module = PreferenceModule(name, reference="precomputed", optimizer=adam())
        module.reference.prepare(module.policy, split, torch.device("cpu"), contextlib.nullcontext, "32-true")
        tables.append(module.reference.tables["train"][:4])
        paths.append(module.reference.paths["train"])
    assert paths[0] != paths[1]
    assert (tables[0] - tables[1]).abs().max() > 1e-3  # the config changes what the weights compute


def test_a_frozen_copy_is_cast_like_the_policy_under_bf16_true(tmp_path):
    """Under bf16-true Lightning casts the module's tree; the frozen copy sits outside it and must
    be cast too: at step 0 the policy is the reference, so the loss is ln 2 and the margins 0."""
    module = PreferenceModule(TINY_ALIAS, loss=DPOLoss(beta=0.1), reference="copy", optimizer=adam())
    trainer = Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)  # fmt: skip
    trainer.validate(module, tiny_data())
    metrics = trainer.callback_metrics
    ln2 = torch.tensor(math.log(2), dtype=torch.bfloat16).float()  # the loss is computed in bfloat16
    torch.testing.assert_close(metrics["val/loss"].float(), ln2, atol=1e-6, rtol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[f"val/{name}"].item() == 0.0, name
    reference, _ = module.reference.model(module.policy)
    assert next(reference.parameters()).dtype == torch.bfloat16


def test_precomputing_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """Computing the reference table must not draw from the global RNG (DataLoader iterators do):
    otherwise the training shuffle would depend on whether the table was cached."""
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "first"))
    module = PreferenceModule(TINY_ALIAS, reference="precomputed", optimizer=adam())
    fit_steps(module, tiny_data(), tmp_path, steps=1)
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "second"))  # nothing cached: compute again
    module.reference.tables.clear()
    module.reference.paths.clear()  # the cache moved: find the (absent) file again
    module.reference.stepped = False  # as before the first step: full fine-tuning may compute then only
    state = torch.random.get_rng_state()
    module._prepare_reference(["train", "val"])
    assert set(module.reference.tables) == {"train", "val"}
    assert torch.equal(torch.random.get_rng_state(), state)
