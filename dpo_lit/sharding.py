"""Fully sharded data parallelism (FSDP2, torch's ``fully_shard``) through Lightning's
``ModelParallelStrategy``: each process holds a shard of every weight, gradient and optimizer
state, and gathers a layer's full weights only while that layer runs.

- :class:`FSDP2Strategy` is ``ModelParallelStrategy`` as pure data parallelism: every process is
  one data-parallel rank (``configs/trainer/fsdp.yaml``); it runs on GPUs (NCCL) and on CPUs (gloo).
- :func:`shard` cuts a Hugging Face causal LM (or a peft wrapper of one) into one FSDP unit per
  decoder layer, found by the model's own ``_no_split_modules`` (any architecture), plus the rest
  (embeddings, final norm, LM head) as the root unit. The modules call it in ``configure_model``.
- :func:`in_forward` runs a computation that uses a model's weights outside its ``forward`` (the
  fused LM head over packed rows, a value head on hidden states) as part of a forward of the root
  unit, so that its weights are gathered before and its gradients reduced after.
- :func:`full_state_dict` gathers a sharded model's full weights onto rank 0, for the export.

Every rank must run the same forwards: FSDP gathers a layer's weights from all ranks each time it
runs. The data modules give every rank equal batches, the precomputed reference equal shares, and
generation keeps every rank stepping until all are done (``synced_gpus``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from dpo_lit.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process a data-parallel rank (no tensor parallelism):
    FSDP2 over all of them. The module shards itself in ``configure_model`` (:func:`shard`).

    Args:
        save_distributed_checkpoint: write each rank's shard to a checkpoint folder (True), or gather
            the full weights and optimizer state on rank 0 into one file (False, the default: a
            checkpoint that ``validate`` and a run of another world size can read).
        process_group_backend: ``gloo`` or ``nccl`` (None: by the accelerator).
        timeout: how long a collective waits for the other ranks.
    """

    def __init__(
        self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process, on every node
        super().setup_environment()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is the root of an FSDP2 sharding (:func:`shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face model: the modules whose class it names in
    ``_no_split_modules`` (the units it must never be split inside)."""
    names = set(getattr(_base(model), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ConfigError(
            f"trainer.strategy: {type(_base(model)).__name__} names no decoder layer class in _no_split_modules, "
            "so FSDP cannot tell where to cut it; use DDP for this model"
        )
    return layers


def _call(self: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(self, *args, **kwargs)


def shard(model: nn.Module, mesh) -> nn.Module:
    """``model`` sharded over ``mesh``'s ranks with ``fully_shard``: one unit per decoder layer,
    gathered for its forward and again for its backward, and the rest the root unit, gathered
    from the start of a forward to the end of its backward. Parameters keep their dtype (mixed
    precision is the trainer's autocast) and buffers such as RoPE's ``inv_freq`` stay as they are.
    Frozen parameters (a LoRA base, a frozen reference) are sharded like the others."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)  # the root: torch keeps it gathered between forward and backward
    model.sharded_call = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "sharded_call")
    if hasattr(model, "generate"):  # a peft wrapper's generate runs the inner model's forward, not its own
        register_fsdp_forward_method(model, "generate")
    return model


def in_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args, **kwargs)``, as part of a forward of ``model`` when it is sharded: its
    root unit's weights (embeddings, final norm, LM head) are gathered for ``fn`` and their
    gradients reduce-scattered after the backward, as for ``model(...)``."""
    call = getattr(model, "sharded_call", None)
    return fn(model, *args, **kwargs) if call is None else call(fn, *args, **kwargs)


def release(model: nn.Module) -> None:
    """Free the gathered weights of a sharded model's root unit (torch keeps them after a forward,
    for the backward that a frozen model never runs); nothing for an unsharded model."""
    if is_sharded(model):
        model.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on CPU, on rank 0 (empty on the others; every rank must call
    it); an unsharded model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds it, as read from a checkpoint file) into ``model``,
    sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
