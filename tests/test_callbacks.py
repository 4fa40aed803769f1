"""Monitoring callbacks: sampled KL, the policy/reference sample table, training health, and the
monitored tiny config end to end through the CLI (every metric reaches TensorBoard and the plots)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from lightning import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

import dpo_lit
from dpo_lit.callbacks.guard import NonFiniteError, NonFiniteGuard
from dpo_lit.callbacks.health import TrainingHealth, slope
from dpo_lit.callbacks.kl import KLPoint, SampledKL, kl_jumped
from dpo_lit.callbacks.samples import SampleRow, SampleTable, markdown_table
from dpo_lit.cli import run
from dpo_lit.data import PreferenceDataModule
from dpo_lit.models import TINY_ALIAS
from dpo_lit.module import PreferenceModule
from dpo_lit.pipelines.plots import find_event_dir, plot_run, read_scalars
from dpo_lit.policy import LoRASettings

ASSETS = Path(dpo_lit.__file__).parent / "assets"
STUCK = "loss has stayed at ln 2"
CLIP = 1e-3


class GradProbe(Callback):
    """Beside TrainingHealth (after it in the list): the norm it computed, the norm computed by hand
    in the same hook, and the norm after Lightning's clipping (before the gradients are zeroed)."""

    def __init__(self, health: TrainingHealth) -> None:
        self.health = health
        self.logged: list[float] = []
        self.manual: list[float] = []
        self.clipped: list[float] = []

    @staticmethod
    def norm(pl_module) -> float | None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        return float(torch.cat(grads).norm()) if grads else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.logged.append(self.health.last_grad_norm)
        self.manual.append(self.norm(pl_module))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        if (norm := self.norm(pl_module)) is not None:  # Lightning zeroes before each step's backward
            self.clipped.append(norm)


def fit_tiny(
    tmp_path: Path, lr: float, steps: int, callbacks: list[Callback], module_kwargs: dict | None = None, **kwargs
) -> Trainer:
    """``steps`` DPO steps of the tiny model at learning rate ``lr``, one validation batch at the end."""
    torch.manual_seed(0)
    module = PreferenceModule(
        TINY_ALIAS, optimizer=lambda params: torch.optim.AdamW(params, lr=lr), warmup_ratio=0.0, **(module_kwargs or {})
    )
    data = PreferenceDataModule(
        tokenizer_name=TINY_ALIAS, train_files=[str(ASSETS / "tiny_pairs.jsonl")],
        val_files=[str(ASSETS / "tiny_pairs_val.jsonl")], batch_size=4, max_length=256, max_prompt_length=128,
    )  # fmt: skip
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
        val_check_interval=steps, num_sanity_val_steps=0, log_every_n_steps=1, callbacks=callbacks, **kwargs,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def small_kl(**kwargs) -> SampledKL:
    return SampledKL(num_prompts=4, num_samples=2, max_new_tokens=8, **kwargs)


def messages(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


# ---- with the policy equal to the reference (learning rate 0) ------------------------------------


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """lr = 0: the policy stays the reference for 3 steps (loss ln 2, zero margins)."""
    callbacks = [small_kl(), TrainingHealth(stuck_steps=3), SampleTable(max_new_tokens=12)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_tiny(tmp_path_factory.mktemp("frozen"), lr=0.0, steps=3, callbacks=callbacks)
    return trainer, callbacks, caught


def test_kl_is_zero_while_the_policy_is_the_reference(frozen_run):
    trainer, (kl, _, _), _ = frozen_run
    assert abs(float(trainer.callback_metrics["val/kl"])) < 1e-4
    assert kl.history == [KLPoint(3, kl.last.mean, kl.last.stderr)] and kl.last.n == 8
    assert 0.0 <= float(trainer.callback_metrics["val/kl_finished"]) <= 1.0


def test_stuck_warning_fires_at_ln2_with_zero_margins(frozen_run):
    trainer, (_, health, _), caught = frozen_run
    stuck = messages(caught, STUCK)
    assert len(stuck) == 1 and "for 3 steps" in stuck[0] and "check beta > 0" in stuck[0]
    assert health.warned and trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    assert float(trainer.callback_metrics["train/margin_trend"]) == 0.0


def test_sample_table_policy_matches_reference_before_training(frozen_run):
    trainer, (_, _, table), _ = frozen_run
    assert len(table.last_rows) == 3
    for row in table.last_rows:
        assert row.prompt and row.reference and row.policy == row.reference
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(find_event_dir(trainer.logger.log_dir)))
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_a_lora_policy_is_compared_with_its_base_weights(tmp_path):
    """reference: adapter: the reference is the policy inside ``disable_adapter`` (LoRA B starts at 0)."""
    kl, table = small_kl(), SampleTable(max_new_tokens=12)
    module_kwargs = {"reference": "adapter", "lora": LoRASettings(r=4, alpha=8)}
    trainer = fit_tiny(tmp_path, lr=0.0, steps=1, callbacks=[kl, table], module_kwargs=module_kwargs)
    assert abs(float(trainer.callback_metrics["val/kl"])) < 1e-4
    assert all(row.policy == row.reference for row in table.last_rows)


# ---- with real updates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moving_run(tmp_path_factory):
    """lr = 1e-2 for 4 steps, gradients clipped at 1e-3: the policy leaves the reference."""
    kl = SampledKL(num_prompts=16, num_samples=4, max_new_tokens=8, batch_size=64, every_n_steps=2)
    health = TrainingHealth(stuck_steps=3)
    callbacks = [kl, health, GradProbe(health)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_tiny(tmp_path_factory.mktemp("moving"), lr=1e-2, steps=4, callbacks=callbacks, gradient_clip_val=CLIP)
    return trainer, callbacks, caught


def test_kl_grows_after_training_steps(moving_run):
    trainer, (kl, _, _), _ = moving_run
    assert [point.step for point in kl.history] == [2, 4]  # the validation at step 4 reuses train/kl
    assert kl.history[-1].mean > 3 * kl.history[-1].stderr > 0
    scalars = read_scalars(trainer.logger.log_dir)
    assert [step for step, _ in scalars["train/kl"]] == [1, 3]  # logger steps count from 0
    assert scalars["val/kl"] == [(3, pytest.approx(scalars["train/kl"][-1][1]))]


def test_grad_norm_is_the_manual_norm_before_clipping(moving_run):
    trainer, (_, health, probe), caught = moving_run
    assert len(probe.manual) == 4
    assert probe.logged == pytest.approx(probe.manual, rel=1e-5)  # float32 sums in another order
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(health.last_grad_norm)
    assert probe.manual[0] > 100 * CLIP and probe.clipped[0] == pytest.approx(CLIP, rel=1e-3)  # before clipping
    assert not messages(caught, STUCK) and not health.warned


def test_margin_trend_is_the_least_squares_slope():
    assert slope([(s, 2.0 * s + 1.0) for s in range(10)]) == pytest.approx(2.0)
    assert slope([(1, 5.0)]) == 0.0 and slope([(3, 1.0), (3, 2.0)]) == 0.0
    points = [(1, 0.0), (2, 1.0), (3, 0.5), (4, 2.0)]  # x̄ = 2.5, ȳ = 0.875: Σdx·dy / Σdx² = 2.75 / 5
    assert slope(points) == pytest.approx(0.55)


# ---- the KL jump logic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "previous,current,jumped",
    [
        (0.1, 0.2, False),  # 2×
        (0.1, 0.5, False),  # 5×, but only 0.4 nats
        (0.3, 1.0, True),  # 3.3× and 0.7 nats
        (2.0, 4.0, False),  # 2 nats, but only 2×
        (0.0, 0.6, True),
        (1.0, 0.2, False),
    ],
)
def test_kl_jumped(previous, current, jumped):
    assert kl_jumped(previous, current, factor=3.0, min_jump=0.5) is jumped


def test_jump_warns_on_a_synthetic_history_and_can_stop():
    callback = SampledKL(stop_on_jump=True)
    trainer = SimpleNamespace(should_stop=False)
    callback.history = [KLPoint(10, 0.2, 0.05), KLPoint(20, 0.3, 0.05)]
    callback._check_jump(trainer)
    assert not trainer.should_stop
    callback.history.append(KLPoint(30, 2.5, 0.3))
    with pytest.warns(UserWarning, match=r"jumped from 0.3 .* \(step 20\) to 2.5 .* \(step 30\).*stopping"):
        callback._check_jump(trainer)
    assert trainer.should_stop
    resumed = SampledKL()
    resumed.load_state_dict(callback.state_dict())  # a resumed run keeps comparing with the last value
    assert resumed.history == callback.history


def test_no_reference_model_warns_once_and_measures_nothing():
    callback = SampledKL()
    module = SimpleNamespace(policy=None, reference=SimpleNamespace(model=lambda policy: None))
    with pytest.warns(UserWarning, match="no KL is measured"):
        assert callback.measure(None, module) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callback.measure(None, module) is None


def test_markdown_table_escapes_cells():
    text = markdown_table([SampleRow("a|b", "line one\nline two", "")], step=7)
    assert text.splitlines()[0] == "**step 7**"
    assert text.splitlines()[-1] == "| a\\|b | line one<br>line two | (empty) |"


# ---- the monitored tiny config through the CLI ---------------------------------------------------

EXPECTED = [
    *(f"{split}/{name}" for split in ("train", "val") for name in (
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected",
    )),
    "val/kl", "val/kl_stderr", "val/kl_finished", "train/grad_norm", "train/lr", "train/margin_trend",
    "cap/wikitext/ppl", "cap/wikitext/ppl_delta", "cap/arc_easy/acc", "cap/arc_easy/acc_delta", "cap/piqa/acc",
    "cap/piqa/acc_delta",
]  # fmt: skip


def test_monitored_config_logs_every_metric_and_plots(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(ROOT)
    cli = run([
        "fit", "--config", "configs/dpo/tiny.yaml", "--config", "configs/callbacks/monitoring.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    scalars = read_scalars(tmp_path)
    missing = [name for name in EXPECTED if name not in scalars]
    assert not missing, f"not in the TensorBoard events: {missing}"
    assert [step for step, _ in scalars["val/kl"]] == [1, 3]  # two validations (logger steps count from 0)
    assert all(math.isfinite(value) for name in EXPECTED for _, value in scalars[name])
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.name.startswith("best-step=")
    written = plot_run(tmp_path, tmp_path / "plots")
    names = ["loss", "margins", "accuracy", "kl", "capability", "overview"]
    assert [p.name for p in written] == [f"{n}.png" for n in names]
    assert all(p.stat().st_size > 10_000 for p in written)


# ---- NonFiniteGuard under fp16 mixed precision -----------------------------------------------------


class PoisonAt(Callback):
    """Sets one policy weight to NaN before training step ``step``: every loss from then on is NaN,
    as in a run that diverged (the scaler skips every update, so the weight stays NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.policy.parameters()).view(-1)[0] = float("nan")


def fp16_plugin(init_scale: float) -> MixedPrecision:
    """16-mixed on CPU with a CPU GradScaler starting at ``init_scale`` (Lightning makes none on CPU)."""
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_guard_leaves_fp16_overflow_steps_to_the_grad_scaler_and_counts_them_apart(tmp_path):
    """From a scale of 2^24 the fp16 gradients overflow until the GradScaler has halved its scale
    enough: each overflow is a step the scaler skips (it halves on an overflow and grows only after
    2000 clean steps, so it skipped log2(2^24 / final scale) steps). The guard, even at
    max_in_a_row=1, neither warns nor stops; it counts those steps in train/scaler_skipped_steps and
    none in train/skipped_steps. A NaN loss under the same scaler still warns and stops the run."""
    plugin = fp16_plugin(2.0**24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_tiny(tmp_path / "overflow", 1e-3, 10, [NonFiniteGuard(max_in_a_row=1)],
                           plugins=[plugin])
    overflows = math.log2(2.0**24 / plugin.scaler.get_scale())
    assert overflows >= 2 and trainer.global_step == 10
    assert not messages(caught, "optimizer step skipped")
    scalars = read_scalars(find_event_dir(tmp_path / "overflow"))
    assert scalars["train/scaler_skipped_steps"][-1][1] == overflows
    assert [v for _, v in scalars["train/skipped_steps"]] == [0.0] * 10

    with pytest.warns(UserWarning, match="step 3: non-finite loss or gradient, optimizer step skipped"):
        with pytest.raises(NonFiniteError, match="training stopped at step 4: 2 optimizer steps in a row"):
            callbacks = [PoisonAt(3), NonFiniteGuard(max_in_a_row=2)]
            fit_tiny(tmp_path / "nan", 1e-3, 8, callbacks, plugins=[fp16_plugin(2.0**8)])
