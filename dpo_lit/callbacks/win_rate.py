"""The policy's win rate against the reference on held-out prompts, by a judge, at each validation.

:class:`WinRate` samples ``num_samples`` completions of each held-out prompt from the reference
once per run and from the policy at each validation (fit and ``dpo-lit validate``), with the same
seed, so sample i of a prompt is paired with the reference's sample i (and, at the start of
training, the policy's samples are the reference's: a win rate of exactly 0.5). A
:class:`~dpo_lit.judges.Judge` compares each pair; ``val/win_rate`` is the mean verdict (ties count
half) and ``val/win_rate_stderr`` its standard error over prompts (a prompt's pairs averaged
first), :func:`~dpo_lit.sampling.measure.win_rate`.

It works with every module that has ``policy``, ``reference`` and ``tokenizer`` and keeps a
reference model in memory (a frozen copy, or the policy with its LoRA adapter off).
"""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dpo_lit.data.io import DataSource
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.errors import ConfigError
from dpo_lit.judges import Judge
from dpo_lit.sampling.measure import Measurement, MeasureSpec, measure, reference_model, win_rate


class WinRate(Callback):
    """``val/win_rate`` ± ``val/win_rate_stderr`` of the policy against the reference.

    Args:
        judge: compares a policy and a reference completion of a prompt (``class_path``:
            RewardJudge, RewardModelJudge, ...).
        prompts_file: held-out prompts (``.txt``, one a line, or a data file with a ``prompt`` field).
        num_prompts: use the first ``num_prompts`` prompts (None: all).
        num_samples: completions per prompt (each the policy's and the reference's).
        max_new_tokens: bound on a completion's tokens.
        chat: render prompts with the chat template (None: when the tokenizer has one).
        batch_size: rows per ``generate`` call.
        seed: sampling seed, the same for the reference and at every validation.
    """

    def __init__(
        self, judge: Judge, prompts_file: DataSource, num_prompts: int | None = None, num_samples: int = 2,
        max_new_tokens: int = 32, chat: bool | None = None, batch_size: int = 32, seed: int = 1234,
    ) -> None:
        if num_samples < 1 or (num_prompts is not None and num_prompts < 1):
            raise ConfigError(f"WinRate: num_samples and num_prompts must be >= 1, got {num_samples}, {num_prompts}")
        self.judge, self.prompts_file, self.num_prompts = judge, prompts_file, num_prompts
        self.spec = MeasureSpec(num_samples, max_new_tokens, batch_size, seed)
        self.chat = chat
        self.reference: Measurement | None = None
        self.last: tuple[float, float] | None = None
        self._prompts: list = []
        self._ids: list[list[int]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._ids:
            self._prompts = read_prompts(self.prompts_file)[: self.num_prompts]
            if len(self._prompts) < 2:
                raise ConfigError(f"WinRate: need at least 2 prompts for a standard error ({self.prompts_file})")
            self._ids = encode_prompts(pl_module.tokenizer, self._prompts, self.chat)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        """The win rate now: the reference's samples (drawn once), the policy's, the judge's verdicts."""
        found = reference_model(pl_module)
        if found is None:
            raise ConfigError(
                "WinRate: this run keeps no reference model to sample from (full fine-tuning with precomputed or no "
                "reference log-probs); use model.reference: copy, or LoRA"
            )
        reference, context = found
        with trainer.precision_plugin.forward_context():
            if self.reference is None:
                with context():
                    self.reference = measure(reference, pl_module.tokenizer, self._prompts, self._ids, self.spec)
            policy = measure(pl_module.policy, pl_module.tokenizer, self._prompts, self._ids, self.spec)
        return win_rate(policy, self.reference, self.judge, self._prompts)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last = self.measure(trainer, pl_module)
        pl_module.log("val/win_rate", self.last[0])
        pl_module.log("val/win_rate_stderr", self.last[1])
        if trainer.state.fn != "fit":
            rank_zero_info(f"WinRate: the policy wins {self.last[0]:.3f} ± {self.last[1]:.3f} against the reference")
