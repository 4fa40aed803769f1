"""What the policy writes, next to what the reference writes, at every validation.

:class:`SampleTable` completes a few fixed prompts with the policy and with the reference and logs
a Markdown table (prompt | reference | policy) to TensorBoard's Text tab under ``samples``. Greedy
decoding (the default) is deterministic, so any difference between the two columns is drift of
the policy, not sampling noise; the reference column never changes and is generated once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.prompts import encode_prompts
from dpo_lit.errors import ConfigError
from dpo_lit.sampling.sample import sample

DEFAULT_PROMPTS = (
    "How do I make a good cup of coffee?",
    "My friend forgot my birthday. What should I say to them?",
    "Describe a quiet evening at home.",
)
NO_REFERENCE = "(no reference model in memory)"


@dataclass(frozen=True)
class SampleRow:
    """One prompt and the two completions of it."""

    prompt: str
    reference: str
    policy: str


def complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    context: Callable[[], AbstractContextManager] | None = None,
) -> list[str]:
    """One decoded completion per prompt: greedy for ``temperature == 0``, else sampled with
    ``seed`` (no top-k/top-p). ``context`` is entered around generation (e.g. ``disable_adapter``)."""
    with context() if context is not None else contextlib.nullcontext():
        samples = sample(
            model, tokenizer, prompts, 1, max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
        )
    return [s.text for s in samples]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, line breaks as <br>."""
    text = text.strip().replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(text.splitlines()) or "(empty)"


def markdown_table(rows: Sequence[SampleRow], step: int) -> str:
    """The rows as a Markdown table, headed by the step."""
    lines = [f"**step {step}**", "", "| prompt | reference | policy |", "|---|---|---|"]
    lines += [f"| {_cell(r.prompt)} | {_cell(r.reference)} | {_cell(r.policy)} |" for r in rows]
    return "\n".join(lines)


class SampleTable(Callback):
    """Completions of fixed prompts by the policy and the reference, logged at validation end.

    The table goes to every TensorBoard logger as text (``samples``, at the global step); other
    loggers are skipped. The last table's rows stay in ``last_rows``.

    Args:
        prompts: the prompts, each one user message (rendered with the chat template when the
            tokenizer has one); None: 3 built-in everyday prompts.
        max_new_tokens: bound on each completion.
        every_n_val: generate at every n-th validation of fit (always in validate).
        temperature: 0 for greedy decoding (deterministic: differences are the policy's drift);
            above 0 samples at that temperature with ``seed`` (the same samples at every call for
            the same model).
        seed: sampling seed when ``temperature > 0``.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 48,
        every_n_val: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        if every_n_val < 1:
            raise ConfigError(f"SampleTable: every_n_val must be at least 1, got {every_n_val}")
        if temperature < 0:
            raise ConfigError(f"SampleTable: temperature must be >= 0, got {temperature}")
        self.prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        self.max_new_tokens = max_new_tokens
        self.every_n_val = every_n_val
        self.temperature = temperature
        self.seed = seed
        self.last_rows: list[SampleRow] = []
        self._tokenizer = None
        self._prompt_ids: list[list[int]] = []
        self._reference_texts: list[str] | None = None
        self._validations = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._prompt_ids:
            self._tokenizer = pl_module.tokenizer
            self._prompt_ids = encode_prompts(self._tokenizer, self.prompts)

    def _complete(self, model: nn.Module, context=None) -> list[str]:
        return complete(
            model, self._tokenizer, self._prompt_ids, self.max_new_tokens, self.temperature, self.seed,
            context=context,
        )  # fmt: skip

    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[SampleRow]:
        """The table's rows now; the reference's completions are generated once and reused."""
        with trainer.precision_plugin.forward_context():
            if self._reference_texts is None:
                found = pl_module.reference.model(pl_module.policy)
                if found is None:
                    rank_zero_warn("SampleTable: no reference model in memory; the reference column stays empty")
                    self._reference_texts = [NO_REFERENCE] * len(self.prompts)
                else:
                    self._reference_texts = self._complete(*found)
            policy = self._complete(pl_module.policy)
        return [SampleRow(p, r, c) for p, r, c in zip(self.prompts, self._reference_texts, policy)]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts:
            return
        self._validations += 1
        if trainer.state.fn == "fit" and self._validations % self.every_n_val:
            return
        self.last_rows = self.generate(trainer, pl_module)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: Trainer) -> None:
        text = markdown_table(self.last_rows, trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, trainer.global_step)
