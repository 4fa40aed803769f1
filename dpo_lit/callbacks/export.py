"""Save the trained model with ``save_pretrained`` next to the checkpoints when fit ends, with a model
card, and optionally push it to the Hugging Face Hub.

The trained model is the module's ``policy``, or its ``reward_model`` for a reward model."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dpo_lit.errors import UserError

EXPORT_FOLDERS = ("merged", "policy", "reward_model")  # what ExportPretrained writes, the one to load first


class ExportPretrained(Callback):
    """Write ``<run>/policy`` (a reward model: ``<run>/reward_model``; the full model, or the LoRA
    adapter) and optionally ``<run>/merged``.

    ``<run>`` is the folder that holds ``checkpoints/`` (the logger's version folder). Each export
    carries the tokenizer, so ``AutoModelForCausalLM.from_pretrained(path)`` (or peft's
    ``AutoPeftModelForCausalLM`` for an adapter) loads it directly.

    Each folder gets a ``README.md`` model card: the method (module, loss and its arguments), the
    base model, reference, LoRA settings, data, steps and the final validation metrics.

    Args:
        enabled: export at the end of ``fit``.
        merge: with LoRA, also write the base model with the adapter merged into its weights.
        push_to_hub: a Hub repository id (``user/name``) to upload the export to (the merged model
            when there is one), with its card; needs the network and a token with write access
            (``huggingface-cli login`` or ``HF_TOKEN``). None: nothing is uploaded.
        private: create the Hub repository private.
    """

    def __init__(
        self, enabled: bool = True, merge: bool = False, push_to_hub: str | None = None, private: bool = True
    ) -> None:
        self.enabled = enabled
        self.merge = merge
        self.push_to_hub = push_to_hub
        self.private = private

    @staticmethod
    def run_dir(trainer: Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def exported(run_dir: Path) -> Path | None:
        """What a run wrote to ``run_dir``, the model to load next: the merged model under LoRA with
        ``merge``, else the policy (or reward model) folder; None when it exported nothing."""
        return next((run_dir / name for name in EXPORT_FOLDERS if (run_dir / name).is_dir()), None)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.fast_dev_run:
            return
        # Every rank: under sharding the full weights are gathered onto rank 0 (a copy that one
        # process can save); otherwise the trained model itself.
        exportable = getattr(pl_module, "exportable_model", None)
        policy = exportable() if exportable is not None else pl_module.policy
        if trainer.global_rank != 0:
            return
        root = self.run_dir(trainer)
        tokenizer = pl_module.tokenizer
        name = "reward_model" if getattr(pl_module, "reward_model", None) is not None else "policy"
        policy.save_pretrained(root / name)
        _name_base_as_configured(root / name, getattr(pl_module.hparams, "model_name", None))
        tokenizer.save_pretrained(root / name)
        adapter = hasattr(policy, "peft_config")
        (root / name / "README.md").write_text(model_card(trainer, pl_module, adapter=adapter))
        rank_zero_info(f"{name.replace('_', ' ').capitalize()} saved to {root / name}")
        exported = root / name
        if self.merge and hasattr(policy, "merge_and_unload"):
            merged = copy.deepcopy(policy).merge_and_unload()
            merged.save_pretrained(root / "merged")
            tokenizer.save_pretrained(root / "merged")
            (root / "merged" / "README.md").write_text(model_card(trainer, pl_module, adapter=False))
            rank_zero_info(f"Merged model saved to {root / 'merged'}")
            exported = root / "merged"
        if self.push_to_hub:
            push(exported, self.push_to_hub, self.private)


def push(folder: Path, repo_id: str, private: bool) -> None:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing); a failure (no network,
    no token, no write access) ends in one line that says the export is kept locally."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        url = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="dpo-lit export")
    except Exception as error:  # huggingface_hub raises many kinds; every one means the same to the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"export.push_to_hub: uploading {folder} to {repo_id} failed ({reason}); the export is kept there") from None
    rank_zero_info(f"Pushed {folder} to {url}")


def _arguments(obj) -> dict:
    """The constructor arguments an object keeps as attributes of the same name (a loss's beta, ...)."""
    names = [p for p in inspect.signature(type(obj).__init__).parameters if p != "self"]
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def model_card(trainer: Trainer, pl_module: LightningModule, adapter: bool) -> str:
    """A Hugging Face model card (``README.md``) for the export: YAML metadata, then how it was trained
    and the final validation metrics."""
    hparams = pl_module.hparams
    base = hparams.get("model_name", "?")
    loss = getattr(pl_module, "loss", None)
    reference = getattr(pl_module, "reference", None)
    data = trainer.datamodule
    sources = [_as_shared(source) for source in getattr(data, "train_files", [])]
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags:",
        "- dpo-lit",
        *([f"- {type(loss).__name__.removesuffix('Loss').lower()}"] if loss is not None else []),
        "---",
        "",
        f"# {type(pl_module).__name__} from {base}",
        "",
        f"Trained with dpo-lit ({'a LoRA adapter' if adapter else 'full weights'}).",
        "",
        f"- method: {type(pl_module).__name__}"
        + (f", loss {type(loss).__name__}({', '.join(f'{k}={v!r}' for k, v in _arguments(loss).items())})" if loss is not None else ""),
        f"- base model: {base}",
        *([f"- reference: {type(reference).__name__}"] if reference is not None else []),
        f"- LoRA: {hparams.get('lora')!r}" if hparams.get("lora") else "- LoRA: none (full fine-tuning)",
        f"- data: {', '.join(sources) or '?'} ({len(getattr(data, 'train_dataset', None) or [])} training examples)",
        f"- training: {trainer.global_step} optimizer steps, precision {trainer.precision}",
        "",
        "## Final validation metrics",
        "",
    ]
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(("val/", "cap/"))}
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in metrics.items())]
    else:
        lines.append("(no validation ran)")
    return "\n".join(lines) + "\n"


def _as_shared(source: str) -> str:
    """A data source as a model card names it: a Hub split as it is, a local file relative to the
    current directory when it lies below it (no absolute path of this machine in a shared card)."""
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


def _name_base_as_configured(folder: Path, model_name: str | None) -> None:
    """A LoRA adapter's ``adapter_config.json`` names its base model as the run's ``model_name``
    (a Hub name, an alias, a folder as the user wrote it), not the local cache folder it was loaded
    from, which exists on this machine only. Rewritten after saving: peft would look the name up."""
    path = folder / "adapter_config.json"
    if model_name is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = model_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
