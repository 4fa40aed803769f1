"""Where the reference log-probs of a batch come from: one small strategy object per mode.

``PreferenceModule(reference=...)`` picks one by name; each answers ``logps(module, batch, split)``
with the per-row reference log-probs (2B,) or ``None``:

- ``copy``: a frozen copy of the initial policy (eval mode, no grad). It is kept outside the
  module's parameter tree, so it is never trained, never saved in checkpoints and never seen by the
  optimizer; it follows the module to its device.
- ``adapter``: the policy itself with its LoRA adapter switched off (needs ``lora``): no second
  copy of the weights in memory.
- ``precomputed``: the reference's log-probs for every example are computed once, before training,
  from the initial policy, cached on disk under a key that hashes the weights and the tokenised
  data, and looked up by example index afterwards (later runs on the same data reuse the file).
- ``none``: no reference, for reference-free losses (SimPO, ORPO, SFT).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpo_lit.logps import completion_logps, reference_options
from dpo_lit.models import cache_dir


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _row_logps(model: nn.Module, batch: dict, module) -> Tensor:
    """Reference rows (2B,), with the token weighting the module's loss asks for (LD-DPO), if any."""
    logps, _ = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
        module.hparams.logps_chunk, reference_options(module.loss.logps_options),
    )
    return logps


class NoReference:
    """Reference-free training: there are no reference log-probs."""

    def setup(self, module) -> None:
        """Called once in the module's __init__, after the policy is loaded, before any adapter."""

    def prepare(self, module, splits: list[str]) -> None:
        """Called when fitting or validating starts, on the module's device."""

    def logps(self, module, batch: dict, split: str) -> Tensor | None:
        return None

    def model(self, module) -> tuple[nn.Module, Callable[[], ContextManager]] | None:
        """The reference as a model, for sampling-based measurements such as KL(π‖π_ref).

        Returns ``(model, context)``: run ``model`` inside ``context()`` to get the reference's
        outputs; ``None`` when no reference model is in memory.
        """
        return None


class CopyReference(NoReference):
    """A frozen copy of the policy as it was before training."""

    def setup(self, module) -> None:
        frozen = copy.deepcopy(module.policy)
        frozen.requires_grad_(False)
        frozen.eval()
        self.frozen = frozen

    def prepare(self, module, splits: list[str]) -> None:
        self.frozen.to(module.device)

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        return _row_logps(self.frozen, batch, module)

    def model(self, module) -> tuple[nn.Module, Callable[[], ContextManager]]:
        return self.frozen, contextlib.nullcontext


class AdapterReference(NoReference):
    """The policy with its LoRA adapter disabled (peft's ``disable_adapter``)."""

    def setup(self, module) -> None:
        if module.hparams.lora is None:
            raise ValueError("model.reference=adapter needs a LoRA adapter: set model.lora (e.g. --model.lora.r=16)")

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        with module.policy.disable_adapter(), _eval_mode(module.policy):
            return _row_logps(module.policy, batch, module)

    def model(self, module) -> tuple[nn.Module, Callable[[], ContextManager]]:
        return module.policy, module.policy.disable_adapter


def _initial_policy(module):
    """A context in which ``module.policy`` computes what it did before training started."""
    if hasattr(module.policy, "disable_adapter"):
        return module.policy.disable_adapter()
    return contextlib.nullcontext()


class PrecomputedReference(NoReference):
    """Reference log-probs computed once per example before training and cached on disk."""

    def setup(self, module) -> None:
        if module.loss.data_mode != "paired":
            raise ValueError(
                f"model.reference=precomputed supports paired losses only; {type(module.loss).__name__} "
                "pairs each completion with another prompt in the batch. Use reference: copy or adapter."
            )
        self.tables: dict[str, Tensor] = {}
        self._weights_hash: str | None = None

    def _key(self, module, dataset) -> str:
        if self._weights_hash is None:  # hash the initial weights once, before any step changes them
            h = hashlib.sha256()
            for name, tensor in module.policy.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._weights_hash = h.hexdigest()
        h = hashlib.sha256(self._weights_hash.encode())
        options = reference_options(module.loss.logps_options)
        if options is not None:  # e.g. LD-DPO's token weights change the sums: their own table
            h.update(repr(options).encode())
        for example in dataset:
            for key in sorted(k for k in example if k.endswith("_ids")):
                h.update(key.encode())
                h.update(torch.tensor(example[key], dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()[:24]

    def prepare(self, module, splits: list[str]) -> None:
        datamodule = module.trainer.datamodule
        for split in splits:
            dataset = getattr(datamodule, f"{split}_dataset", None)
            if split in self.tables or not dataset:
                continue
            path = cache_dir() / "ref_logps" / f"{self._key(module, dataset)}.pt"
            if path.exists():
                rank_zero_info(f"Reference log-probs for {split} ({len(dataset)} pairs) read from {path}")
                self.tables[split] = torch.load(path)
                continue
            self.tables[split] = self._compute(module, datamodule.ordered_dataloader(split), len(dataset))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.tables[split], tmp)
            tmp.replace(path)
            rank_zero_info(f"Reference log-probs for {split} ({len(dataset)} pairs) cached in {path}")

    @torch.no_grad()
    def _compute(self, module, loader, n: int) -> Tensor:
        table = torch.full((n, 2), float("nan"))  # (N, [chosen, rejected])
        # fork_rng: iterating a DataLoader draws from the global RNG, which would make the training
        # shuffle depend on whether the table was computed now or read from the cache.
        with torch.random.fork_rng(devices=[]), _initial_policy(module), _eval_mode(module.policy), \
                module.trainer.precision_plugin.forward_context():
            for batch in loader:
                batch = {k: v.to(module.device) for k, v in batch.items()}
                rows = _row_logps(module.policy, batch, module).float().cpu()
                table[batch["index"].cpu()] = rows.view(2, -1).T  # rows: B chosen then B rejected
        if torch.isnan(table).any():
            raise RuntimeError("precomputing reference log-probs left examples without a value")
        return table

    def model(self, module) -> tuple[nn.Module, Callable[[], ContextManager]] | None:
        """With LoRA the base weights are still the reference; after full fine-tuning none is kept."""
        if hasattr(module.policy, "disable_adapter"):
            return module.policy, module.policy.disable_adapter
        return None

    def logps(self, module, batch: dict, split: str) -> Tensor:
        table = self.tables[split].to(module.device)[batch["index"]]  # (B, 2)
        return torch.cat([table[:, 0], table[:, 1]])


REFERENCES = {"copy": CopyReference, "adapter": AdapterReference, "precomputed": PrecomputedReference, "none": NoReference}
