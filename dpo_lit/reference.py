"""Where the reference log-probs of a batch come from: one small object per kind of reference.

Chosen in YAML like the loss (``model.reference: {class_path: dpo_lit.reference.SyncedReference,
init_args: {mixup_alpha: 0.6, sync_steps: 64}}``); the names ``copy``, ``adapter``,
``precomputed`` and ``none`` are shortcuts for the first four classes with their defaults.

- :class:`CopyReference` (``copy``): a frozen copy of the initial policy (eval mode, no grad),
  kept outside the module's parameter tree: never trained, never in the optimizer, not saved.
- :class:`AdapterReference` (``adapter``): the policy itself with its LoRA adapter switched off:
  no second copy of the weights in memory.
- :class:`PrecomputedReference` (``precomputed``): the reference log-probs of the examples the
  run will use (all, unless ``max_steps`` and the ``limit_*_batches`` say fewer), computed before
  training from the initial policy, with a progress bar; cached on disk per example under a hash
  of the weights, the precision they run in and the tokenised data (later runs reuse them and
  compute only what they add); looked up by index.
- :class:`NoReference` (``none``): reference-free losses (SimPO, ORPO, SFT).
- :class:`SyncedReference`: TR-DPO (Gorbatovski et al. 2024): a copy that every ``sync_steps``
  optimizer steps moves towards the policy, ``ref ← α·policy + (1 − α)·ref``.

A reference is handed what it needs — the policy, a batch, the data to precompute over — never
the whole LightningModule. The module calls, in this order: :meth:`~Reference.setup` once
(the policy as loaded, before any adapter), :meth:`~Reference.prepare` when fit or validate
starts, :meth:`~Reference.logps` each step, :meth:`~Reference.after_step` after each training
batch; :meth:`~Reference.state_dict` goes into checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpo_lit.data.io import atomic_write
from dpo_lit.errors import ConfigError
from dpo_lit.logps import LogpsOptions, completion_logps
from dpo_lit.models import cache_dir, evaluating, model_hash
from dpo_lit.sharding import full_state_dict, load_full_state_dict, release

ModelAndContext = tuple[nn.Module, Callable[[], ContextManager]]


class Processes(Protocol):
    """What a reference needs of the run's processes (a Lightning ``Strategy`` has it all)."""

    global_rank: int
    world_size: int

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather(self, tensor: Tensor) -> Tensor: ...


class OneProcess:
    """A run of one process."""

    global_rank, world_size = 0, 1

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)
# split -> (dataset in index order, a function returning a loader over the given examples (None: all)
# in that order, the examples the run will use (None: all or not known))
SplitData = Mapping[str, tuple[Dataset, Callable[[Sequence[int] | None], DataLoader], Sequence[int] | None]]


def row_logps(
    model: nn.Module, batch: dict, chunk: int | None, options: LogpsOptions | None = None, packing: str = "prefix"
) -> Tensor:
    """Completion log-probs of every row of a collated batch, (2B,), summed with the token weights
    ``options`` asks for (LD-DPO), if any."""
    logps, _ = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk, options, packing
    )
    return logps


def _unchanged(model: nn.Module) -> nn.Module:
    return model


def initial_policy(policy: nn.Module) -> ContextManager:
    """A context in which ``policy`` computes what it did before training (its LoRA adapter off)."""
    return policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext()


class Reference:
    """What a reference is to the module (the methods below, called in the order the module
    docstring gives); as it stands, no reference model: ``logps`` gives None. Each kind of reference
    is a subclass, :class:`NoReference` the one for reference-free losses."""

    def setup(
        self, policy: nn.Module, *, lora: bool, paired: bool, chunk: int | None, options: LogpsOptions | None = None,
        packing: str = "prefix", initial: Callable[[], nn.Module] | None = None,
    ) -> None:
        """Once, in the module's ``__init__``: the policy as loaded, before any adapter is added
        (and before Lightning loads a checkpoint's weights into it).

        Args:
            policy: the freshly loaded policy.
            lora: whether a LoRA adapter will be added to it.
            paired: whether the loss trains on pairs (False: unpaired rows, KTO).
            chunk: rows of logits computed at once (``model.logps_chunk``; None: by the vocabulary).
            options: token weighting of the sums the loss asks of its reference (LD-DPO), if any.
            packing: how rows are laid out for the forward (``model.packing``, :mod:`dpo_lit.packing`).
            initial: loads the policy's initial weights again (None: they cannot be), for a
                reference that needs them once training or a checkpoint has replaced them.
        """
        self.chunk = chunk
        self.options = options
        self.packing = packing

    def prepare(
        self, policy: nn.Module, data: SplitData, device: torch.device, context: Callable, precision: str = "",
        processes: Processes | None = None, convert: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """When fit or validate starts, on the module's device, in every process; ``context()`` is
        the precision context and ``precision`` its name (``32-true``, ``bf16-mixed``, ...);
        ``processes`` the run's processes (the trainer's strategy; None: one); ``convert`` casts a
        model as the precision casts the policy (``bf16-true`` makes its weights bfloat16; None:
        leave it), for models the reference keeps outside the module's tree."""

    def shard(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        """Under a sharding strategy, after the policy is sharded: shard any model the reference keeps
        beside it with ``shard`` (every rank then holds a shard of it, not a full copy)."""

    def logps(self, policy: nn.Module, batch: dict, split: str) -> Tensor | None:
        """Reference log-probs of the batch's rows, (2B,), or None."""
        return None

    def model(self, policy: nn.Module) -> ModelAndContext | None:
        """The reference as a model for sampling-based measurements such as KL(π‖π_ref).

        Returns ``(model, context)``: run ``model`` inside ``context()`` to get the reference's
        outputs; ``None`` when no reference model is in memory.
        """
        return None

    def after_step(self, policy: nn.Module, step: int) -> None:
        """After each training batch; ``step`` counts the optimizer steps taken so far."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume with this reference (nothing, by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""


class NoReference(Reference):
    """No reference log-probs: reference-free losses (SimPO, ORPO, SFT) pick it themselves."""


class CopyReference(Reference):
    """A frozen copy of the policy as it was before training."""

    def setup(
        self, policy: nn.Module, *, lora: bool, paired: bool, chunk: int | None, options: LogpsOptions | None = None,
        packing: str = "prefix", initial: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().setup(policy, lora=lora, paired=paired, chunk=chunk, options=options, packing=packing)
        self.frozen = copy.deepcopy(policy).requires_grad_(False).eval()

    def prepare(
        self, policy: nn.Module, data: SplitData, device: torch.device, context: Callable, precision: str = "",
        processes: Processes | None = None, convert: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        # Outside the module's tree, the copy is cast by nobody else: under bf16-true it would
        # run in float32 against a bfloat16 policy, and the loss at step 0 would not be ln 2.
        self.frozen = (convert or _unchanged)(self.frozen).to(device)

    def shard(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        self.frozen = shard(self.frozen)

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: dict, split: str) -> Tensor:
        logps = row_logps(self.frozen, batch, self.chunk, self.options, self.packing)
        release(self.frozen)  # sharded: no backward will free its gathered root weights
        return logps

    def model(self, policy: nn.Module) -> ModelAndContext:
        return self.frozen, contextlib.nullcontext


class AdapterReference(Reference):
    """The policy with its LoRA adapter disabled (peft's ``disable_adapter``)."""

    def setup(
        self, policy: nn.Module, *, lora: bool, paired: bool, chunk: int | None, options: LogpsOptions | None = None,
        packing: str = "prefix", initial: Callable[[], nn.Module] | None = None,
    ) -> None:
        if not lora:
            raise ConfigError("model.reference: adapter needs a LoRA adapter: set model.lora (e.g. model.lora.r: 16)")
        super().setup(policy, lora=lora, paired=paired, chunk=chunk, options=options, packing=packing)

    def logps(self, policy: nn.Module, batch: dict, split: str) -> Tensor:
        with policy.disable_adapter(), evaluating(policy):
            return row_logps(policy, batch, self.chunk, self.options, self.packing)

    def model(self, policy: nn.Module) -> ModelAndContext:
        return policy, policy.disable_adapter


class PrecomputedReference(Reference):
    """Reference log-probs computed before training for the examples the run will use, cached on disk.

    They come from the initial weights, whatever the policy holds when they are needed: with LoRA
    the policy with its adapter off; with full fine-tuning the policy before its first step, or,
    once steps or a checkpoint (``--ckpt_path``: Lightning loads its weights before ``prepare``)
    have replaced those weights, a fresh load of ``model_name`` whose hash is checked against the
    run's. The hash of the initial weights and config (:func:`~dpo_lit.models.model_hash`), taken
    in ``setup``, names the cache files and travels in checkpoints with the tables.
    """

    def setup(
        self, policy: nn.Module, *, lora: bool, paired: bool, chunk: int | None, options: LogpsOptions | None = None,
        packing: str = "prefix", initial: Callable[[], nn.Module] | None = None,
    ) -> None:
        if not paired:
            raise ConfigError(
                "model.reference: precomputed supports paired losses only (an unpaired loss pairs each "
                "completion with another prompt in the batch); use copy or adapter"
            )
        super().setup(policy, lora=lora, paired=paired, chunk=chunk, options=options, packing=packing)
        self.lora = lora
        self.initial = initial
        self.identity = model_hash(policy)  # the initial weights: no checkpoint has been loaded yet
        self.policy_is_initial = True  # False once a step or a checkpoint has changed its weights
        self.tables: dict[str, Tensor] = {}
        self.paths: dict[str, Path] = {}  # split -> its cache file

    def _key(self, dataset: Dataset, precision: str) -> str:
        """Hash of the initial model, how it is run (precision, the fused head's chunking, packing) and
        the token ids."""
        how = f"{precision}|fused head, chunk {self.chunk}|{self.options!r}|{self.packing}"
        h = hashlib.sha256(f"{self.identity}|{how}".encode())
        for example in dataset:
            for key in sorted(k for k in example if k.endswith("_ids")):
                h.update(key.encode())
                h.update(torch.tensor(example[key], dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()[:24]

    def prepare(
        self, policy: nn.Module, data: SplitData, device: torch.device, context: Callable, precision: str = "",
        processes: Processes | None = None, convert: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """Fill the table of each split for the examples the run will use (all when not known),
        reading what an earlier run with the same initial model and data computed from the cache.

        With several processes, each computes an equal share of what is missing (every rank runs
        the same number of forward passes, as FSDP's and DeepSpeed's sharded weights need), the
        shares are gathered into every rank's table, and rank 0 alone writes the cache: every
        example computed once, by one process."""
        processes = processes or OneProcess()
        model = None  # the initial model, loaded again when the policy no longer holds it
        for split, (dataset, loader, needed) in data.items():
            if not dataset:
                continue
            if split not in self.paths:  # hashing the split's token ids once per run, not per validation
                self.paths[split] = cache_dir() / "ref_logps" / f"{self._key(dataset, precision)}.pt"
            path = self.paths[split]
            table = self.tables.get(split)
            if table is None:
                table = torch.load(path) if path.exists() else torch.full((len(dataset), 2), float("nan"))
            elif path.exists():  # rows the checkpoint lacks that another run has cached
                cached = torch.load(path)
                table = torch.where(torch.isnan(table) & ~torch.isnan(cached), cached, table)
            wanted = torch.arange(len(dataset)) if needed is None else torch.as_tensor(list(needed), dtype=torch.long)
            missing = processes.broadcast(wanted[torch.isnan(table[wanted]).any(-1)].tolist())  # rank 0's view
            self.tables[split] = table
            if not missing:
                continue
            if model is None:
                model = policy if self.policy_is_initial or self.lora else self._load_initial(len(missing), split, convert)
                model = model.to(device)
            rank, world = processes.global_rank, processes.world_size
            share = missing[rank::world]
            share += missing[: -(-len(missing) // world) - len(share)]  # equal shares: pad with repeats
            with context():
                self._compute(model, loader(share), table, device, f"reference log-probs ({split})")
            if world > 1:  # every rank's rows, each from the rank whose share it was
                gathered = processes.all_gather(table[missing].to(device)).cpu()  # (world, len(missing), 2)
                position = torch.arange(len(missing))
                table[missing] = gathered[position % world, position]
            if processes.global_rank == 0:
                with atomic_write(path) as tmp:
                    torch.save(table, tmp)
            done = int((~torch.isnan(table).any(-1)).sum())
            rank_zero_info(
                f"Reference log-probs for {len(missing)} {split} pairs computed ({done} of {len(dataset)} "
                f"cached in {path})"
            )

    def _load_initial(self, missing: int, split: str, convert: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
        """The initial model, loaded again (full fine-tuning after a step or a checkpoint load)."""
        why = f"reference log-probs of {missing} {split} examples are missing and the policy's initial weights are gone"
        if self.initial is None:
            raise ConfigError(f"model.reference: {why}; this module cannot load them again: use reference copy")
        model = self.initial()
        if model_hash(model) != self.identity:
            raise ConfigError(
                f"model.model_name: {why}, and it now loads other weights or config than the run started from; "
                "restore them or use reference copy"
            )
        rank_zero_info(f"model.reference: {why} (trained or loaded from a checkpoint): loading model_name again")
        return (convert or _unchanged)(model)

    @torch.no_grad()
    def _compute(self, model: nn.Module, loader: DataLoader, table: Tensor, device: torch.device, desc: str) -> None:
        # fork_rng: iterating a DataLoader draws from the global RNG, which would make the training
        # shuffle depend on whether the table was computed now or read from the cache.
        with torch.random.fork_rng(devices=[]), initial_policy(model), evaluating(model):
            for batch in tqdm(loader, desc=desc, unit="batch", disable=rank_zero_only.rank != 0, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                rows = row_logps(model, batch, self.chunk, self.options, self.packing).float().cpu()
                table[batch["index"].cpu()] = rows.view(2, -1).T  # rows: B chosen then B rejected

    def after_step(self, policy: nn.Module, step: int) -> None:
        self.policy_is_initial = False  # full fine-tuning: the initial weights are gone

    def logps(self, policy: nn.Module, batch: dict, split: str) -> Tensor:
        table = self.tables[split].to(batch["index"].device)[batch["index"]]  # (B, 2)
        if torch.isnan(table).any():
            raise RuntimeError(f"{split} examples without precomputed reference log-probs: the run used batches "
                               "it did not plan for")  # fmt: skip
        return torch.cat([table[:, 0], table[:, 1]])

    def model(self, policy: nn.Module) -> ModelAndContext | None:
        """With LoRA the base weights are still the reference; after full fine-tuning none is kept."""
        return (policy, policy.disable_adapter) if hasattr(policy, "disable_adapter") else None

    def state_dict(self) -> dict[str, Any]:
        return {"tables": dict(self.tables), "identity": self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's tables; Lightning then loads its weights into the policy, so they are no
        longer the initial ones. A checkpoint of a run that started from other weights is refused."""
        identity = state.get("identity", self.identity)  # checkpoints written before it was saved
        if identity != self.identity:
            raise ConfigError(
                "model.model_name: the checkpoint's run started from other initial weights or config than "
                "model_name loads, so its precomputed reference log-probs do not belong to this model"
            )
        self.tables.update(state.get("tables", {}))
        self.policy_is_initial = False


class SyncedReference(CopyReference):
    """TR-DPO's reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment"): a frozen copy that is periodically moved towards the policy.

    Every ``sync_steps`` optimizer steps, ``θ_ref ← α·θ_policy + (1 − α)·θ_ref`` (the paper's
    soft update; ``α = 1`` is its hard update, a plain copy). Between updates it is a frozen copy.
    Its weights change, so they are saved in checkpoints (a resumed run continues from them).
    Full fine-tuning only: with LoRA the policy's weights are the base plus an adapter.

    Args:
        mixup_alpha: α in (0, 1], the weight of the policy in each update.
        sync_steps: optimizer steps between updates (≥ 1).
    """

    def __init__(self, mixup_alpha: float = 0.6, sync_steps: int = 512) -> None:
        if not 0.0 < mixup_alpha <= 1.0:
            raise ConfigError(f"model.reference.init_args.mixup_alpha: must be in (0, 1], got {mixup_alpha}")
        if sync_steps < 1:
            raise ConfigError(f"model.reference.init_args.sync_steps: must be >= 1, got {sync_steps}")
        self.mixup_alpha = mixup_alpha
        self.sync_steps = sync_steps
        self.last_step = 0

    def setup(
        self, policy: nn.Module, *, lora: bool, paired: bool, chunk: int | None, options: LogpsOptions | None = None,
        packing: str = "prefix", initial: Callable[[], nn.Module] | None = None,
    ) -> None:
        if lora:
            raise ConfigError("model.reference: SyncedReference needs full fine-tuning (model.lora: null)")
        super().setup(policy, lora=lora, paired=paired, chunk=chunk, options=options, packing=packing)

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """``θ_ref ← α·θ_policy + (1 − α)·θ_ref``, parameter by parameter (matched by name); under
        sharding each rank updates its own shards."""
        release(policy)  # sharded: both as shards, each rank updating its own
        release(self.frozen)
        params = dict(policy.named_parameters())
        for name, ref in self.frozen.named_parameters():
            ref.lerp_(params[name].detach().to(ref.dtype), self.mixup_alpha)

    def after_step(self, policy: nn.Module, step: int) -> None:
        if step > self.last_step and step % self.sync_steps == 0:
            self.sync(policy)
        self.last_step = max(self.last_step, step)

    def state_dict(self) -> dict[str, Any]:
        """The copy's full weights (under sharding gathered onto rank 0, which writes the checkpoint)."""
        return {"weights": full_state_dict(self.frozen), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            load_full_state_dict(self.frozen, state["weights"])
            self.last_step = state["last_step"]


SHORTCUTS: dict[str, type[Reference]] = {
    "copy": CopyReference,
    "adapter": AdapterReference,
    "precomputed": PrecomputedReference,
    "none": NoReference,
}
