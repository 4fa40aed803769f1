"""Runs that end early end well: a SIGKILLed run resumes to the exact weights of an uninterrupted
one, 2 DDP processes train as 1 at the same global batch, a checkpoint is whole or not written, a
non-finite loss skips its step instead of poisoning the weights."""

import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import KILLER, ROOT, dpo_lit, max_difference, policy_weights
from lightning import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from dpo_lit.callbacks.checkpoint import AtomicCheckpointIO
from dpo_lit.callbacks.guard import NonFiniteError, NonFiniteGuard
from dpo_lit.data import PreferenceDataModule
from dpo_lit.errors import OutputError
from dpo_lit.models import TINY_ALIAS
from dpo_lit.module import PreferenceModule
from dpo_lit.pipelines.plots import find_event_dir, read_scalars

TINY = ["--config", "configs/dpo/tiny.yaml", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=-1"]
EVERY_5_STEPS = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.save_top_k=-1"]  # fmt: skip
@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny config's 48 steps (8 epochs of 6 batches) without interruption: its final weights."""
    root = tmp_path_factory.mktemp("straight")
    done = dpo_lit("fit", *TINY, "--trainer.max_steps=48", f"--trainer.default_root_dir={root}")
    assert done.returncode == 0, done.stderr[-2000:]
    return policy_weights(root)


@pytest.mark.parametrize(
    "checkpoints, kill_at, resumed_from",
    [([], 9, 6), (EVERY_5_STEPS, 13, 10)],  # first checkpoint at the end of epoch 0 (6 batches); or every 5 steps
    ids=["epoch-end", "every-5-steps"],
)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path, straight, checkpoints, kill_at, resumed_from):
    """The 48 steps straight through, against the same run SIGKILLed mid-epoch and resumed with
    --ckpt_path last: the data order, the LR schedule, the optimizer and the RNG go on where the
    checkpoint left them, to the bit."""
    (tmp_path / "killer.py").write_text(KILLER)
    run = [*TINY, "--trainer.max_steps=48", f"--trainer.default_root_dir={tmp_path / 'b'}", *checkpoints]
    killed = dpo_lit("fit", *run, "--trainer.callbacks+=killer.KillAt", f"--trainer.callbacks.step={kill_at}",
                     env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = tmp_path / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == resumed_from
    assert not list(saved.parent.glob("*.partial"))

    resumed = dpo_lit("fit", *run, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"ckpt_path=last: {saved}" in resumed.stderr + resumed.stdout
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders that restart an epoch
    resumed_weights = policy_weights(tmp_path / "b")  # the resumed run goes on in version_0
    assert resumed_weights["global_step"] == 48
    assert max_difference(straight, resumed_weights) == 0.0


def validated(run_dir: Path) -> dict[str, float]:
    """The val/ scalars a ``dpo-lit validate`` wrote under ``run_dir``."""
    return {tag: points[-1][1] for tag, points in read_scalars(run_dir).items() if tag.startswith("val/")}


def test_validating_a_checkpoint_never_takes_the_precomputed_reference_from_trained_weights(tmp_path):
    """A full fine-tuning fit with the reference precomputed, whose checkpoint holds the reference
    log-probs of half the validation set (limit_val_batches 1): validate --ckpt_path of it, with no
    cache to read, computes the other half from the initial weights (model_name loaded again, not
    the trained policy the checkpoint put in its place), under the initial weights' cache key, and
    so agrees with validate --model.reference copy of the same checkpoint."""
    fit = dpo_lit("fit", *TINY, "--trainer.max_steps=12", "--model.reference=precomputed",
                  "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path / 'fit'}",
                  env={"DPO_LIT_CACHE": str(tmp_path / "cache-fit")})  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = tmp_path / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.isnan(torch.load(ckpt, weights_only=True)["reference"]["tables"]["val"]).any()  # half of it
    metrics, logs = {}, {}
    for reference in ("precomputed", "copy"):
        run = dpo_lit("validate", *TINY, f"--model.reference={reference}", f"--ckpt_path={ckpt}",
                      f"--trainer.default_root_dir={tmp_path / reference}",
                      env={"DPO_LIT_CACHE": str(tmp_path / f"cache-{reference}")})  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        metrics[reference], logs[reference] = validated(tmp_path / reference), run.stderr + run.stdout
    precomputed, copy = metrics["precomputed"], metrics["copy"]
    assert copy["val/rewards/accuracies"] > 0.9 and copy["val/loss"] < 0.3  # trained: far from ln 2
    for tag in ("val/loss", "val/rewards/margins", "val/rewards/chosen", "val/rewards/rejected"):
        assert precomputed[tag] == pytest.approx(copy[tag], abs=1e-4), tag
    assert "Reference log-probs for 8 val pairs computed" in logs["precomputed"]
    assert "loading model_name again" in logs["precomputed"]
    fit_files = {p.name for p in (tmp_path / "cache-fit" / "ref_logps").glob("*.pt")}
    validate_files = {p.name for p in (tmp_path / "cache-precomputed" / "ref_logps").glob("*.pt")}
    assert validate_files and validate_files <= fit_files  # keyed by the initial weights, not the trained ones


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_a_run_resumed_after_max_steps_stopped_it_mid_epoch_equals_the_uninterrupted_run(tmp_path, reference):
    """2 steps (max_steps stops the run a third into epoch 0), then --ckpt_path last with max_steps 5:
    the resumed run trains on batches 2-4 of epoch 0, as 5 steps straight through do, to the bit.
    (A constant LR: a schedule sized by max_steps differs between a 2-step and a 5-step run.)"""
    common = [*TINY, f"--model.reference={reference}", "--model.scheduler=constant"]
    env = {"DPO_LIT_CACHE": str(tmp_path / "cache")}
    straight = dpo_lit("fit", *common, "--trainer.max_steps=5", f"--trainer.default_root_dir={tmp_path / 'a'}", env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    env = {"DPO_LIT_CACHE": str(tmp_path / "cache-b")}  # the resumed run computes what it adds itself
    run = [*common, f"--trainer.default_root_dir={tmp_path / 'b'}"]
    first = dpo_lit("fit", *run, "--trainer.max_steps=2", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = dpo_lit("fit", *run, "--trainer.max_steps=5", "--ckpt_path=last", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights = policy_weights(tmp_path / "b")  # the resumed run goes on in version_0
    assert weights["global_step"] == 5
    assert max_difference(policy_weights(tmp_path / "a"), weights) == 0.0
    assert "schedule was sized for" not in resumed.stderr


def test_resuming_with_more_steps_says_that_the_lr_schedule_is_sized_anew(tmp_path):
    """A linear schedule of 2 steps resumed to 5 cannot be the 5-step run's: one line says so."""
    run = [*TINY, f"--trainer.default_root_dir={tmp_path}"]
    assert dpo_lit("fit", *run, "--trainer.max_steps=2").returncode == 0
    resumed = dpo_lit("fit", *run, "--trainer.max_steps=5", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the checkpoint's linear schedule was sized for 2 steps and this run's for 5" in resumed.stderr


@pytest.mark.parametrize(
    "reference, ddp",
    [("copy", ["--trainer.strategy=ddp", "--trainer.devices=2"]), ("precomputed", ["--trainer", "configs/trainer/ddp.yaml"])],
)
def test_two_ddp_processes_train_as_one_at_the_same_global_batch(tmp_path, reference, ddp):
    """12 steps with 2 gloo processes of batch 4 against 1 process of batch 8: each rank trains on
    its half of the same global batches, so the weights agree to float rounding; the precomputed
    reference is computed once (each rank its share of the examples), and cached once."""
    common = [*TINY, "--trainer.max_steps=12", f"--model.reference={reference}"]
    one = dpo_lit("fit", *common, "--data.batch_size=8", f"--trainer.default_root_dir={tmp_path / 'one'}",
                  env={"DPO_LIT_CACHE": str(tmp_path / "cache-one")})  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = dpo_lit("fit", *common, "--data.batch_size=4", *ddp,
                  f"--trainer.default_root_dir={tmp_path / 'two'}", env={"DPO_LIT_CACHE": str(tmp_path / "cache-two")})  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = policy_weights(tmp_path / "one"), policy_weights(tmp_path / "two")
    assert b["global_step"] == 12
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two.stdout + two.stderr
    assert max_difference(a, b) <= 1e-4  # float rounding: the two processes sum the gradient in another order
    if reference == "precomputed":
        log = two.stdout + two.stderr
        assert log.count("Reference log-probs for 48 train pairs computed") == 1
        assert log.count("Reference log-probs for 16 val pairs computed") == 1
        assert len(list((tmp_path / "cache-two" / "ref_logps").glob("*.pt"))) == 2


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path):
    """The write goes to NAME.partial first: here that is /dev/full, so it fails with "No space
    left on device" as on a full disk; last.ckpt keeps its previous contents and the error names it."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    (tmp_path / "last.ckpt.partial").symlink_to("/dev/full")
    with pytest.raises(OutputError, match=rf"^{path}: cannot write: No space left on device$"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1 << 16)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not (tmp_path / "last.ckpt.partial").exists()
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    done = dpo_lit("fit", *TINY, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'a_file' / 'runs'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"dpo-lit: error: {tmp_path / 'a_file' / 'runs'}: Not a directory"
    assert "Traceback" not in done.stderr


class NaNLossAt(PreferenceModule):
    """The tiny DPO module whose loss is NaN at the given optimizer steps (a NaN injected into the
    real loss, so the backward pass spreads it to every gradient as a diverging run would)."""

    def __init__(self, nan_steps: set[int], **kwargs) -> None:
        super().__init__(TINY_ALIAS, **kwargs)
        self.nan_steps = nan_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


class WeightsPerStep(Callback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(torch.cat([p.detach().flatten().clone() for p in pl_module.policy.parameters()]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(torch.cat([p.detach().flatten().clone() for p in pl_module.policy.parameters()]))


def fit_with_nans(
    tmp_path: Path, nan_steps: set[int], steps: int, guard: NonFiniteGuard, **trainer_kwargs
) -> tuple[Trainer, WeightsPerStep]:
    module = NaNLossAt(nan_steps, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), warmup_ratio=0.0)
    data = PreferenceDataModule(
        tokenizer_name=TINY_ALIAS, train_files=["dpo_lit/assets/tiny_pairs.jsonl"], val_fraction=0.0, batch_size=8,
        max_length=256, max_prompt_length=128,
    )  # fmt: skip
    probe = WeightsPerStep()
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[guard, probe],
        **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer, probe


def test_a_nan_loss_skips_the_step_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    guard = NonFiniteGuard()
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradient, optimizer step skipped \(records "
                      r"dpo_lit/assets/tiny_pairs.jsonl:\d+"):  # fmt: skip
        trainer, probe = fit_with_nans(tmp_path, {2}, steps=5, guard=guard)
    assert trainer.global_step == 5 and guard.skipped == 1
    assert torch.equal(probe.before[2], probe.after[2])  # the NaN step changed nothing
    assert all(not torch.equal(b, a) for i, (b, a) in enumerate(zip(probe.before, probe.after)) if i != 2)
    assert torch.isfinite(probe.after[-1]).all()
    state = next(iter(trainer.optimizers[0].state.values()))
    assert int(state["step"]) == 4  # Adam's own step count passed over the skipped one
    scalars = read_scalars(find_event_dir(tmp_path))["train/skipped_steps"]
    assert [value for _, value in scalars] == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_nan_steps_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(NonFiniteError, match=r"^training stopped at step 3: 2 optimizer steps in a row had a non-finite "
                       r"loss or gradient \(last batch: records dpo_lit/assets/tiny_pairs.jsonl:\d+"):  # fmt: skip
        fit_with_nans(tmp_path, {2, 3, 4}, steps=6, guard=NonFiniteGuard(max_in_a_row=2))


def test_guard_leaves_fp16_overflow_steps_to_the_grad_scaler(tmp_path, monkeypatch):
    """16-mixed with a GradScaler whose initial scale (2^24) overflows fp16 gradients: the scaler
    skips those steps and halves its scale until they fit, as it is meant to; the guard neither
    warns nor stops the run (it used to count each overflow as divergence and stop at 5 in a row).
    A NaN loss under the same scaler is still counted and warned about."""
    monkeypatch.chdir(ROOT)
    guard = NonFiniteGuard(max_in_a_row=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer step skipped.*")
        fit_with_nans(tmp_path / "a", set(), steps=12, guard=guard, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert scaler.get_scale() <= 2.0**18  # at least 6 overflowed steps in a row were skipped by the scaler
    assert guard.skipped == 0
    guard = NonFiniteGuard(max_in_a_row=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with pytest.warns(UserWarning, match=r"step 3: non-finite loss or gradient, optimizer step skipped"):
        fit_with_nans(tmp_path / "b", {3}, steps=5, guard=guard, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert guard.skipped == 1


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One file per kind of bad data a user meets, each with its 3rd record (or byte) to blame,
    and what the one line must say after ``PATH:``."""
    import gzip
    import json

    good = [json.dumps({"prompt": "Hi", "chosen": "Hello there!", "rejected": "Go away."})] * 2
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Bye."}]}  # fmt: skip
    cases = {
        "not-utf8": (b"\n".join(line.encode() for line in good) + b'\n{"prompt": "caf\xe9"}\n', "jsonl", "3: "),
        "unknown-role": ("\n".join([json.dumps(conv)] * 2 + [json.dumps(
            {**conv, "prompt": [{"role": "narrator", "content": "Once"}]})]), "jsonl",
            "3: field 'prompt[0].role': unknown role 'narrator'"),  # fmt: skip
        "completion-not-assistant": ("\n".join([json.dumps(conv)] * 2 + [json.dumps(
            {**conv, "chosen": [{"role": "user", "content": "?"}]})]), "jsonl",
            "3: field 'chosen[0].role': a completion must end with an assistant turn"),  # fmt: skip
        "token-id-outside-vocab": ("\n".join(json.dumps({"prompt_ids": [1, 2], "chosen_ids": [3, i], "rejected_ids": [5]})
                                             for i in (4, 6, 100000)), "jsonl",
                                   "3: field 'chosen_ids': token id 100000 is outside the tokenizer's vocabulary"),  # fmt: skip
        "empty-file": ("", "jsonl", " no training examples"),
    }
    files = {}
    for name, (content, suffix, expected) in cases.items():
        path = tmp_path / f"{name}.{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        files[name] = (path, expected)
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(("\n".join(good * 50) + "\n").encode())[:-40])
    files["truncated-gz"] = (truncated, ":")
    return files


@pytest.mark.parametrize(
    "case", ["not-utf8", "truncated-gz", "unknown-role", "completion-not-assistant", "token-id-outside-vocab", "empty-file"]
)
def test_bad_data_ends_dpo_lit_fit_in_one_line_naming_file_and_line(tmp_path, case):
    path, expected = _bad_files(tmp_path)[case]
    done = dpo_lit("fit", *TINY, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'runs'}",
                   f"--data.train_files=[{path}]", "--data.val_fraction=0")  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dpo-lit: error: {path}") and expected in last, last
