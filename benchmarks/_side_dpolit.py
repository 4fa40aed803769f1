"""dpo-lit side of the DPO step benchmark (a child of dpo_step.py; its own process, so its peak RSS is its own).

    python benchmarks/_side_dpolit.py SPEC.json     # writes result.json beside SPEC.json

PreferenceModule + PreferenceDataModule driven by ``lightning.Trainer(max_steps=warmup + steps)``.
"""

from __future__ import annotations

import inspect
import sys
import time

WALL_START = time.perf_counter()

import torch  # noqa: E402
from _common import Spec, StepClock, finish  # noqa: E402


class InOrder:
    """Mixin: train batches in dataset order, so that TRL (sequential sampler) gets the same batches."""

    def train_dataloader(self):
        return self._loader(self.train_dataset, self.batch_size, shuffle=False)


def build(spec: Spec, clock: StepClock):
    from functools import partial

    from lightning import Callback, Trainer, seed_everything

    from dpo_lit.data import PreferenceDataModule
    from dpo_lit.losses import DPOLoss
    from dpo_lit.module import PreferenceModule
    from dpo_lit.packing import layout
    from dpo_lit.policy import LoRASettings

    class Data(InOrder, PreferenceDataModule):
        pass

    class Module(PreferenceModule):
        def on_fit_start(self) -> None:  # the reference's preparation: the precompute, if any
            t0 = time.perf_counter()
            super().on_fit_start()
            if spec.reference == "precomputed":
                clock.timings["precompute_s"] = time.perf_counter() - t0

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            clock.start(pl_module.policy, trainer.precision)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            plan = layout(*args, share_prompts=spec.packing == "prefix") if spec.packing != "none" else None
            positions = batch["input_ids"].numel() if plan is None else plan.input_ids.shape[1]
            clock.step_end(args[1].sum().item(), args[2].sum().item(), loss.item(), positions)

    seed_everything(spec.seed, verbose=False)
    t0 = time.perf_counter()
    data = Data(
        tokenizer_name=spec.model_path, train_files=[spec.pairs_jsonl], format="tokenized" if spec.tokenized else "implicit",
        on_bad_record="skip", max_length=spec.max_length, max_prompt_length=spec.max_prompt_length,
        batch_size=spec.batch_size, val_fraction=0.0, seed=spec.seed, num_workers=0,
    )
    data.setup("fit")
    clock.timings["tokenize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora = LoRASettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=0.0, target_modules="all-linear")
    module = Module(
        spec.model_path, loss=DPOLoss(beta=spec.beta), reference=spec.reference,
        lora=lora if spec.variant == "lora" else None,
        optimizer=partial(torch.optim.AdamW, lr=spec.lr, weight_decay=0.0),
        scheduler="constant", warmup_ratio=0.0, gradient_checkpointing=False, packing=spec.packing,
        **({"fused_head": spec.fused_head} if "fused_head" in inspect.signature(PreferenceModule).parameters else {}),
    )  # (an older checkout, measured for comparison, has no fused_head)
    clock.timings["load_s"] = time.perf_counter() - t0
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=spec.total_steps,
        precision="bf16-mixed" if spec.bf16 else "32-true",
        gradient_clip_val=spec.max_grad_norm, accumulate_grad_batches=1,
        logger=False, log_every_n_steps=spec.total_steps, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=spec.out_dir, callbacks=[Clock()],
    )
    return trainer, module, data


def main(spec_path: str) -> None:
    spec = Spec.load(spec_path)
    torch.set_num_threads(spec.threads)
    clock = StepClock(spec.warmup)
    trainer, module, data = build(spec, clock)
    trainer.fit(module, datamodule=data)
    finish(spec, clock, WALL_START)


if __name__ == "__main__":
    main(sys.argv[1])
