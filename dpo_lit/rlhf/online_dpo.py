"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): the
on-policy version of DPO inside one fit. Each step the policy samples two completions of every
prompt of the batch, the reward (or a :class:`~dpo_lit.judges.Judge`) picks the chosen one, and any
of our pairwise losses (``model.loss``: DPO, IPO, SimPO, ...) trains on those pairs.

    dpo-lit fit --config configs/online_dpo/tiny.yaml

A prompt whose two completions tie (equal scores, or the judge's 0.5) gives no pair that step; a
step where every prompt ties makes no update.
Between-rounds on-policy training (generate a whole pair file, then fit on it) is ``dpo-lit
onpolicy``; here the pairs come from the policy of the step that trains on them. Rollouts, scoring,
the reference and validation are :class:`~dpo_lit.rlhf.online.OnlineModule`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse import lazy_instance

from dpo_lit.errors import ConfigError
from dpo_lit.judges import Judge
from dpo_lit.logps import completion_logps, reference_options
from dpo_lit.losses import DPOLoss, PreferenceLoss
from dpo_lit.models import evaluating
from dpo_lit.rlhf.online import OnlineModule


class OnlineDPOModule(OnlineModule):
    """Two rollouts per prompt, judged into a pair, and a pairwise loss on the pairs, every step.

    Args:
        model_name: the policy (usually the SFT model); the reference is the same weights, frozen.
        loss: the pairwise objective, chosen by ``class_path`` (DPOLoss, IPOLoss, SimPOLoss, ...).
        judge: picks the better of the two completions (None: the higher ``reward``, after
            ``missing_eos_penalty``).
        **kwargs: the rollouts' and the trained model's settings (:class:`~dpo_lit.rlhf.online.OnlineModule`:
            ``reward``, ``max_new_tokens``, ``temperature``, ...); ``samples_per_prompt`` is 2.
    """

    hparams_ignore = ("reward", "loss", "judge")  # objects: rebuilt from the config

    def __init__(
        self,
        model_name: str,
        loss: PreferenceLoss = lazy_instance(DPOLoss, beta=0.1),
        judge: Judge | None = None,
        samples_per_prompt: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, samples_per_prompt=samples_per_prompt, **kwargs)
        if samples_per_prompt != 2:
            raise ConfigError(f"model.samples_per_prompt: online DPO samples a pair per prompt, so it is 2, got "
                              f"{samples_per_prompt}")  # fmt: skip
        if loss.data_mode != "paired":
            raise ConfigError(f"model.loss: online DPO trains on pairs; {type(loss).__name__} trains on unpaired examples")
        self.loss, self.judge = loss, judge

    def preferences(self, prompts: list, r) -> torch.Tensor:
        """(P,) per prompt: 1.0 where its first completion is chosen, 0.0 the second, 0.5 a tie."""
        first, second = r.samples[0::2], r.samples[1::2]
        if self.judge is not None:
            return self.judge(prompts, [s.text for s in first], [s.text for s in second],
                              [s.finished for s in first], [s.finished for s in second]).to(self.device)  # fmt: skip
        a, b = r.penalised[0::2], r.penalised[1::2]
        return torch.where(a == b, 0.5, (a > b).float())

    def pair_loss(self, r, rows: torch.Tensor):
        """The loss's output on the rollouts' ``rows``: B chosen rows, then their B rejected rows."""
        length = int(r.mask[rows].sum(-1).max())
        ids, mask, completion = r.ids[rows, :length], r.mask[rows, :length], r.completion_mask[rows, :length]
        policy_rows, tokens = completion_logps(self.policy, ids, mask, completion, None, self.loss.logps_options)
        ref_rows = None
        if self.loss.needs_reference:
            reference, context = self.reference.model(self.policy)
            with torch.no_grad(), evaluating(self.policy), context():
                ref_rows, _ = completion_logps(reference, ids, mask, completion, None,
                                               reference_options(self.loss.logps_options))  # fmt: skip
        rows_batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
        return self.loss(self.loss.logps_from_rows(policy_rows, ref_rows, tokens, rows_batch))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        r = self.rollouts(batch)
        prefer = self.preferences(list(batch["prompts"]), r)  # (P,)
        lr = self.optimizers().param_groups[0]["lr"]
        logged = {"reward": r.scores.mean(), "response_length": r.response.sum(-1).mean(),
                  "finished": r.finished.float().mean(), "pairs": (prefer != 0.5).float().mean(), "lr": lr}  # fmt: skip
        decided = (prefer != 0.5).nonzero().squeeze(-1)  # (B,) prompts with a pair
        if int(self.trainer.strategy.reduce(torch.tensor(float(len(decided)), device=self.device), reduce_op="sum")) == 0:
            self.log_train(logged, len(r.samples), prog_bar=("reward",))  # every prompt of every rank tied
            return
        weight = 1.0
        if not len(decided):  # other ranks have pairs: take part in the update with a zero-weighted one
            decided, prefer, weight = decided.new_zeros(1), torch.ones_like(prefer), 0.0
        first_wins = prefer[decided] == 1.0
        chosen = torch.where(first_wins, 2 * decided, 2 * decided + 1)
        rejected = torch.where(first_wins, 2 * decided + 1, 2 * decided)
        out = self.pair_loss(r, torch.cat([chosen, rejected]))  # B chosen rows, then their B rejected rows
        self.update(weight * out.loss)
        logged.update({"loss": out.loss.detach(), "rewards/margins": out.margins.mean(),
                       "rewards/accuracies": out.accuracies.mean(),
                       "score_gap": (r.scores[chosen] - r.scores[rejected]).mean()})  # fmt: skip
        self.log_train(logged, len(r.samples), prog_bar=("reward", "loss"))
