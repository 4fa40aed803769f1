"""TRL side of the DPO step benchmark (a child of dpo_step.py, run with benchmarks/.venv-trl/bin/python).

    benchmarks/.venv-trl/bin/python benchmarks/_side_trl.py SPEC.json   # writes result.json beside SPEC.json

TRL 1.16's ``DPOTrainer`` on the prompt/chosen/rejected strings that dpo-lit's implicit-format
adapter extracted (written by the parent), in the same order (``train_sampling_strategy="sequential"``).
TRL is only ever imported here, in its own venv: it is no dependency of dpo_lit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

WALL_START = time.perf_counter()

import torch  # noqa: E402
from _common import Spec, StepClock, finish  # noqa: E402


def config(spec: Spec):
    """Every setting that differs from TRL's defaults or matters for the comparison, set explicitly."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(Path(spec.out_dir) / "trl_output"),
        use_cpu=True,
        bf16=spec.bf16,  # TRL 1.16 defaults to True (None -> not fp16)
        gradient_checkpointing=False,  # TRL 1.16 defaults to True
        activation_checkpointing=False,  # its new name in transformers 5.23 (the old one is an alias)
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.total_steps,
        max_length=spec.max_length,  # TRL 1.16 has no max_prompt_length: see the README
        truncation_mode="keep_start",
        beta=spec.beta,
        loss_type=["sigmoid"],
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",  # torch.optim.AdamW with its defaults, as dpo-lit
        max_grad_norm=spec.max_grad_norm,
        precompute_ref_log_probs=spec.reference == "precomputed",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        report_to=[],
        logging_steps=spec.total_steps,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        model_init_kwargs={"dtype": "float32"},
    )


def trainer_class(clock: StepClock, spec: Spec):
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class Trainer(DPOTrainer):
        """DPOTrainer that times its data preparation and precompute and counts each step's tokens."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            t0 = time.perf_counter()
            # token ids are trained on as given (what TRL's tokenisation would produce; its collator reads them)
            out = dataset if spec.tokenized else super()._prepare_dataset(dataset, *args, **kwargs)
            clock.timings["tokenize_s"] = clock.timings.get("tokenize_s", 0.0) + time.perf_counter() - t0
            return out

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            clock.timings["precompute_s"] = clock.timings.get("precompute_s", 0.0) + time.perf_counter() - t0
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.bench_step = (
                inputs["attention_mask"].sum().item(), inputs["completion_mask"].sum().item(), loss.item(),
                inputs["input_ids"].numel(),
            )
            return out

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.start(model, self.trainer.accelerator.mixed_precision)

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(*self.trainer.bench_step)

    return Trainer, Clock


def main(spec_path: str) -> None:
    spec = Spec.load(spec_path)
    torch.set_num_threads(spec.threads)
    clock = StepClock(spec.warmup)
    from datasets import Dataset
    from peft import LoraConfig

    from dpo_lit.models import load_tokenizer

    pairs = json.loads(Path(spec.pairs_json).read_text())
    keys = ("prompt_ids", "chosen_ids", "rejected_ids") if spec.tokenized else ("prompt", "chosen", "rejected")
    dataset = Dataset.from_list([{k: p[k] for k in keys} for p in pairs])
    peft_config = None
    if spec.variant == "lora":  # the same LoraConfig as dpo_lit.module.PreferenceModule._add_lora
        peft_config = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
            target_modules="all-linear", task_type="CAUSAL_LM",
        )
    trainer_cls, clock_cls = trainer_class(clock, spec)
    callback = clock_cls()
    t0 = time.perf_counter()
    trainer = trainer_cls(
        model=spec.model_path, args=config(spec), train_dataset=dataset,
        processing_class=load_tokenizer(spec.model_path), peft_config=peft_config, callbacks=[callback],
    )
    construct = time.perf_counter() - t0
    clock.timings["load_s"] = construct - clock.timings["tokenize_s"] - clock.timings.get("precompute_s", 0.0)
    callback.trainer = trainer
    trainer.train()
    finish(spec, clock, WALL_START)


if __name__ == "__main__":
    main(sys.argv[1])
