"""Sample completions from a causal LM, keeping the token ids exactly as sampled.

On-policy pairs and KL estimates need three things that decoded text loses:

- the sampled ids themselves: decoding and re-tokenising does not give them back (for SmolLM2,
  re-tokenising 64 decoded 48-token samples reproduced the sampled ids for only 60);
- whether the model ended the completion (its EOS is kept, inclusive) or ``max_new_tokens`` cut
  it (no EOS is added: the model never wrote one there);
- ``log π(y | x)`` under the model's *unmodified* distribution (temperature 1, no top-k/top-p),
  summed over the completion tokens including the EOS. It is read off the raw logits of each step
  as ``generate`` goes (:class:`StepLogps`, before temperature and top-p process them), so a KL
  estimate needs only the reference's forward, and no step's (rows × vocabulary) logits are kept
  beyond the next step. With temperature ≠ 1 or top-p/top-k the *samples* follow
  the processed distribution while ``logp`` still scores them under the model.

Prompts are token ids, left-padded into batches; attention masks come from the prompts' lengths,
never from pad ids (SmolLM2's pad is its EOS). Every distribution-changing option of the model's
own ``generation_config`` (repetition penalty, default ``top_k=50``, minimum length, ...) is
switched off, so ``temperature=1, top_p=1, top_k=0`` samples from the model itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dpo_lit.data.collate import pad_rows
from dpo_lit.logps import selective_log_softmax
from dpo_lit.models import evaluating
from dpo_lit.sharding import is_sharded

# Values that disable every logits processor generate() may pick up from a model's generation_config.
_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
    "num_beams": 1,
}


@dataclass
class Sample:
    """One sampled completion of one prompt.

    Attributes:
        prompt_index: Position of the prompt in the list given to :func:`sample`.
        prompt_ids: The prompt's token ids (unpadded).
        completion_ids: The ids exactly as sampled, up to and including the EOS when the model
            produced one, nothing after it.
        finished: Whether the model produced the EOS (else ``max_new_tokens`` cut it).
        logp: ``sum_t log π(y_t | x, y_<t)`` over ``completion_ids`` under the model at
            temperature 1 without top-k/top-p.
        text: The completion decoded without special tokens ("" without a tokenizer).
    """

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    finished: bool
    logp: float
    text: str


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside; the CPU's and ``device``'s RNG states are restored after."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    devices = [torch.cuda.current_device() if device.index is None else device.index] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def special_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
) -> tuple[int, int]:
    """EOS and pad ids: explicit arguments first, then the tokenizer's, then the model's config."""
    config = getattr(model, "generation_config", None)
    eos = eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None and config is not None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        raise ValueError("no EOS token id: pass eos_token_id or a tokenizer that has one")
    pad = pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def generate_kwargs(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, eos: int, pad: int
) -> dict[str, Any]:
    """Keyword arguments for ``generate``: exactly the given processors, raw logits out.

    ``temperature == 0`` is greedy decoding (no sampling processors at all).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    return {
        **_NEUTRAL,
        **(sampling if temperature > 0 else {"do_sample": False}),
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "num_return_sequences": 1,
        "return_dict_in_generate": True,
    }


class StepLogps(LogitsProcessor):
    """Records the temperature-1 log-prob of every token ``generate`` picks, step by step.

    Runs first among the processors, so it sees each step's raw logits. The token a step picks is
    known at the next call (the last one of ``input_ids``), so only one step's (N × V) logits are
    held at a time, where ``output_logits`` would keep every step's until the end (16 rows × 512
    steps × 152k vocabulary: 5 GB). :meth:`finish` takes the last step's token.
    """

    def __init__(self) -> None:
        self.logps: list[Tensor] = []  # (N,) per generated token
        self.previous: Tensor | None = None  # the last step's raw logits (N, V)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._picked(input_ids[:, -1])
        self.previous = scores.clone()  # later processors return new tensors; a copy is safe regardless
        return scores

    def _picked(self, tokens: Tensor) -> None:
        if self.previous is not None:
            # The same float32 logsumexp as the training forward: torch.log_softmax over 49k float32
            # logits reads ~6e-6 nats/token high on CPU.
            self.logps.append(selective_log_softmax(self.previous, tokens))
            self.previous = None

    def finish(self, new: Tensor) -> Tensor:
        """(N, T) log-probs of the generated tokens ``new`` (N, T)."""
        self._picked(new[:, -1])
        if len(self.logps) != new.shape[1]:
            raise RuntimeError(f"generate made {new.shape[1]} tokens but called its processors {len(self.logps)} times")
        return torch.stack(self.logps, dim=1) if self.logps else new.new_zeros(new.shape, dtype=torch.float32)


class RowDraws(LogitsProcessor):
    """Draws each row's next token from a generator of its own, seeded by ``(prompt seed, sample
    number)``, and leaves ``generate`` a one-token distribution per row to pick.

    ``generate`` samples a whole batch from one random stream, so a row's tokens depend on the rows
    beside it. This draws every row apart, from temperature, top-k and top-p applied as
    ``generate``'s own warpers apply them (it runs before them; they leave a one-token distribution
    as it is). A row's draws are then a function of its prompt seed and sample number only.
    """

    def __init__(
        self, draws: Sequence[tuple[int, int]], temperature: float, top_p: float, top_k: int, device: torch.device
    ) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(derived_seed(seed, k)) for seed, k in draws]
        warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
        self.warpers = LogitsProcessorList(warpers + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)  # (N, V)
        chosen = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])  # (N,)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


def derived_seed(seed: int, index: int) -> int:
    """A seed that is a function of ``seed`` and ``index`` only (``seed + index`` would give seed 0's
    index 1 the seed of seed 1's index 0), below 2**63: inside ``torch.manual_seed``'s range."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _completions(new: Tensor, token_logps: Tensor, eos: int) -> list[tuple[list[int], bool, float]]:
    """Cut each generated row after its first EOS; sum the log-probs (N, T) of the kept tokens."""
    is_eos = new == eos  # (N, T)
    finished = is_eos.any(-1)  # (N,)
    length = torch.where(finished, is_eos.int().argmax(-1) + 1, new.shape[1])  # (N,) incl. the EOS
    keep = torch.arange(new.shape[1], device=new.device)[None] < length[:, None]  # (N, T)
    logps = (token_logps * keep).sum(-1)  # (N,)
    return [(new[i, : length[i]].tolist(), bool(finished[i]), float(logps[i])) for i in range(len(new))]


def shared_prompt_cache(model: nn.Module, ids: Tensor, mask: Tensor, rows: Sequence[int]):
    """The KV cache of the left-padded rows ``ids`` (N, P) but their last token, computed once per
    distinct prompt and repeated for each of its rows (``rows[i]`` is the prompt of row i; a
    prompt's rows are consecutive). ``generate`` then starts from it and runs only the last prompt
    token per row before sampling: a prompt is encoded once, not once per sample."""
    from transformers import DynamicCache

    starts = torch.tensor([i == 0 or rows[i] != rows[i - 1] for i in range(len(rows))])  # a prompt's first row
    owner = starts.long().cumsum(0) - 1  # (N,) the distinct prompt of each row
    firsts = starts.nonzero().squeeze(-1)
    unique_ids, unique_mask = ids[firsts, :-1], mask[firsts, :-1]
    positions = (unique_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=unique_ids, attention_mask=unique_mask, position_ids=positions, past_key_values=cache,
              use_cache=True)  # fmt: skip
    cache.batch_select_indices(owner.to(ids.device))
    return cache


def sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    prompt_seeds: Sequence[int] | None = None,
    share_prompts: bool = True,
) -> list[Sample]:
    """``num_samples`` completions of every prompt, in prompt order.

    Args:
        model: A Hugging Face causal LM (optionally peft-wrapped); run in eval mode under no_grad,
            its mode restored afterwards.
        tokenizer: Decodes ``text`` and supplies EOS/pad ids; ``None`` works with explicit ids.
        prompts: Token ids of each prompt (see :func:`encode_prompts`).
        num_samples: Completions per prompt.
        max_new_tokens: Bound on completion tokens; a completion cut there keeps no EOS.
        temperature: Sampling temperature; 0 decodes greedily (``logp`` is always at temperature 1).
        top_p: Nucleus sampling threshold (1: off).
        top_k: Top-k sampling (0: off; the model's ``generation_config`` default is overridden).
        batch_size: Rows (prompt × sample) per ``generate`` call.
        seed: Seeds torch's RNG for the call (the global RNG state is left untouched); the same
            seed, prompts and batch size give the same samples.
        eos_token_id: Ends a completion (default: the tokenizer's, else the model's).
        pad_token_id: Fills the left padding (default: the tokenizer's pad, else the EOS).
        prompt_seeds: A seed per prompt: each of a prompt's samples then draws its tokens from a
            generator of its own (:class:`RowDraws`), so a prompt's samples do not depend on the
            other prompts of its batch, the batch size or the process it runs in.
        share_prompts: with several samples of a prompt, encode each prompt of a batch once and
            share its KV cache among its samples (:func:`shared_prompt_cache`), instead of encoding
            it once per sample; the samples are the same either way, up to floating-point rounding.
    """
    if not prompts or num_samples < 1:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos, pad = special_ids(model, tokenizer, eos_token_id, pad_token_id)
    device = next(model.parameters()).device
    rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
    kwargs = generate_kwargs(max_new_tokens, temperature, top_p, top_k, eos, pad)
    if is_sharded(model):  # every rank runs a forward per step until all its peers' rows are done
        kwargs["synced_gpus"] = True
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_seeds)} prompt seeds")
    samples: list[Sample] = []
    with evaluating(model), _seeded(seed, device):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, mask, _ = pad_rows([prompts[i] for i in batch], pad, left=True)  # (N, P)
            ids, mask = ids.to(device), mask.to(device)
            processors = LogitsProcessorList([step_logps := StepLogps()])
            if prompt_seeds is not None and temperature > 0:
                draws = [(prompt_seeds[i], (start + k) % num_samples) for k, i in enumerate(batch)]
                processors.append(RowDraws(draws, temperature, top_p, top_k, device))
            shared = share_prompts and num_samples > 1 and ids.shape[1] > 1  # one-token prompts: nothing to share
            cache = shared_prompt_cache(model, ids, mask, batch) if shared else None
            out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=processors,
                                 past_key_values=cache, **kwargs)  # fmt: skip
            new = out.sequences[:, ids.shape[1] :]  # (N, T)
            for i, (completion, finished, logp) in zip(batch, _completions(new, step_logps.finish(new), eos)):
                text = tokenizer.decode(completion, skip_special_tokens=True) if tokenizer is not None else ""
                samples.append(Sample(i, list(prompts[i]), completion, finished, logp, text))
    return samples
