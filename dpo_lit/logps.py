"""Per-sequence log-probabilities of completions, from one forward pass over a batch of rows.

A DPO step needs ``sum_t log π(y_t | x, y_<t)`` over the completion tokens of every row (chosen and
rejected rows sit in the same batch, so one forward serves both). With SmolLM2's 49,152-token
vocabulary the logits dominate the cost: materialising a float32 log-softmax for every position of
a (2B, T) batch would hold 2B·T·V·4 bytes for the backward pass. Here:

1. the decoder runs once and returns hidden states (2B, T, H);
2. only the hidden states that predict a completion token are kept, (M, H) with M ≪ 2B·T;
3. the LM head and a memory-lean log-softmax (:class:`_SelectiveLogSoftmax`) run over those rows
   in chunks; the float32 normaliser is recomputed chunk by chunk in the backward pass instead of
   being stored.

Skipping the model's own forward also skips what some families do after their LM head (Granite
divides its logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``, Gemma 2
soft-caps them): :func:`head_logits` applies each family's steps from :data:`HEAD_TRANSFORMS`, and
:func:`check_head` compares the two paths once per model and refuses, in one line, a model whose
forward still computes other logits.

A loss may ask for more than plain sums through :class:`LogpsOptions` (LD-DPO's token weights,
WPO's aligned log-probs); without options the computation is exactly the above.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from dpo_lit.errors import ConfigError
from dpo_lit.models import evaluating
from dpo_lit.packing import PACKING, Unpackable, check_packable, layout, packed_hidden

# What a family's forward does to its LM head's input or output (transformers 5.23's modeling code),
# keyed by the model type of the (text) config: ``(config attribute, operation)`` steps, in order.
# The same attribute can mean opposite things (Granite divides by ``logits_scaling``, HyperCLOVAX
# multiplies by it, MiniCPM3 divides the hidden states by it), hence a table by family. Families not
# listed soft-cap like Gemma 2 when their config sets ``final_logit_softcapping``; :func:`check_head`
# refuses a model whose forward still disagrees.
_GRANITE = (("logits_scaling", "divide"),)
_COHERE = (("logit_scale", "multiply"),)
_SOFTCAP_ONLY = (("final_logit_softcapping", "softcap"),)
HEAD_TRANSFORMS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
         "granite4_vision_text", "granite_docling_text"), _GRANITE,
    ),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), _COHERE),
    "falcon_h1": (("lm_head_multiplier", "multiply"),),
    "hyperclovax": (("logits_scaling", "multiply"),),
    "minicpm3": (("logits_scaling", "divide_states"),),
    "inkling_text": (("logits_mup_width_multiplier", "divide_states"), ("unpadded_vocab_size", "truncate")),
    "inkling2_text": (("final_logit_softcapping", "softcap"), ("unpadded_vocab_size", "truncate")),
    **dict.fromkeys(("muse_glimmer_text", "muse_spark_text"), (("output_multiplier", "multiply"), *_SOFTCAP_ONLY)),
    "recurrent_gemma": (("logits_soft_cap", "softcap"),),
    "xlstm": (("output_logit_soft_cap", "softcap"),),
}


@dataclass(frozen=True)
class LogpsOptions:
    """Extra work a loss asks of :func:`completion_logps` (``loss.logps_options``; None asks none).

    Rows come in pairs, row i and row i + N/2 (prompt + chosen and prompt + rejected of one
    example, see :mod:`dpo_lit.data.collate`).

    Args:
        ld_alpha: LD-DPO (Liu et al. 2024): each row's sum weighs the log-probs of its completion
            tokens beyond the pair's shorter completion length by ``ld_alpha`` (the shared part
            by 1). None: plain sums.
        aligned: also compute each row's WPO aligned log-prob (Zhou et al. 2024),
            ``Σ_t [log π(y_t|·) - log Σ_v π(v|·)²]`` over its completion tokens, detached and
            unweighted; ``logps`` then has shape (N, 2): [sum, aligned sum].
    """

    ld_alpha: float | None = None
    aligned: bool = False

    def for_reference(self) -> LogpsOptions | None:
        """What the reference rows need: the same token weights, no aligned column."""
        return None if self.ld_alpha is None else replace(self, aligned=False)


def reference_options(options: LogpsOptions | None) -> LogpsOptions | None:
    """The options to compute reference rows with, given the loss's ``logps_options``."""
    return None if options is None else options.for_reference()


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits)[i, target_i]`` in float32 without keeping a float32 (M, V) tensor.

    Forward saves only the logits (in their own dtype) and the (M,) log-normaliser; backward
    rebuilds the softmax chunk by chunk: d/dz_j = g·(1[j = target] − softmax(z)_j).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:  # logits (M, V)
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 in gradcheck
        lse = logits.new_zeros(len(logits), dtype=acc)
        for start in range(0, len(logits), chunk):
            lse[start : start + chunk] = torch.logsumexp(logits[start : start + chunk].to(acc), dim=-1)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1).to(acc)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, len(logits), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            probs = torch.exp(logits[sl].to(lse.dtype) - lse[sl, None])  # (m, V) float32, one chunk at a time
            g = -grad[sl, None].to(lse.dtype) * probs
            g.scatter_add_(-1, targets[sl, None], grad[sl, None].to(lse.dtype))
            grad_logits[sl] = g.to(logits.dtype)
        return grad_logits, None, None


def selective_log_softmax(logits: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Log-probability of ``targets`` (M,) under ``logits`` (M, V), computed in float32."""
    return _SelectiveLogSoftmax.apply(logits, targets, chunk)


@torch.no_grad()
def log_sum_squared_probs(logits: Tensor, chunk: int = 1024) -> Tensor:
    """``log Σ_v softmax(z)_v²`` per row of ``logits`` (M, V), in float32, chunk by chunk, no gradient.

    Equals ``logsumexp(2z) - 2·logsumexp(z)``: WPO's sampled weight alignment.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    out = logits.new_zeros(len(logits), dtype=acc)
    for start in range(0, len(logits), chunk):
        z = logits[start : start + chunk].to(acc)
        out[start : start + chunk] = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
    return out


def ld_token_weights(target_mask: Tensor, alpha: float) -> Tensor:
    """LD-DPO weight of every scored token, (M,) in ``target_mask[target_mask]`` order.

    ``target_mask`` (N, T-1) marks the positions whose next token is a completion token; rows i
    and i + N/2 are a pair. A token gets 1 while its position within its completion is at most
    the pair's shorter completion length, ``alpha`` beyond it.
    """
    if len(target_mask) % 2:
        raise ValueError(f"LD-DPO weights need paired rows (2B), got {len(target_mask)}")
    lengths = target_mask.sum(-1)  # (N,)
    half = len(lengths) // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)  # (N,)
    position = target_mask.cumsum(-1)  # (N, T-1), 1-based among the completion tokens
    weights = torch.where(position > shared[:, None], alpha, 1.0)  # (N, T-1)
    return weights[target_mask]


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns final-normed hidden states) and the LM head of a causal LM."""
    base = _unwrapped(model)
    return base.get_decoder(), base.get_output_embeddings()


def completion_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, packing: str = "prefix"
) -> tuple[Tensor, Tensor, Tensor]:
    """The final hidden states that predict completion tokens, those tokens and their rows.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: (N, T) prompt + completion, padded.
        attention_mask: (N, T), 1 on real tokens.
        completion_mask: (N, T) bool, True on completion tokens (these get scored).
        packing: how the decoder sees the rows (:mod:`dpo_lit.packing`): ``"prefix"`` packs the real
            tokens into one sequence and computes a prompt shared by several rows once; ``"rows"``
            packs without sharing; ``"none"`` runs the padded batch. All three give the same states
            up to floating-point rounding.

    Returns:
        ``(states, targets, rows)`` of shapes (M, H), (M,), (M,) for the M completion tokens after
        the first position, in row-major order.
    """
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    check_head(model)
    decoder, _ = decoder_and_head(model)
    # Position t predicts token t+1: keep the states whose next token is a completion token.
    target_mask = completion_mask[:, 1:]  # (N, T-1)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    plan = None
    if packing != "none" and not getattr(decoder, "_dpo_lit_unpackable", False):
        plan = layout(input_ids, attention_mask, completion_mask, share_prompts=packing == "prefix")
    if plan is not None:
        try:
            check_packable(decoder)
            hidden = packed_hidden(decoder, plan)  # (1, L, H)
            return hidden[0][plan.where[:, :-1][target_mask]], targets, rows  # (M, H)
        except Unpackable as why:
            decoder._dpo_lit_unpackable = True
            warnings.warn(
                f"{type(decoder).__name__} {why}: its rows are computed padded (set model.packing: none to silence this)",
                stacklevel=2,
            )
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, :-1][target_mask], targets, rows


def _unwrapped(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model: nn.Module):
    """The config that describes the model's language part (a multimodal model's text config)."""
    config = _unwrapped(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_transforms(model: nn.Module) -> list[tuple[str, float]]:
    """The ``(operation, value)`` steps the model's own forward applies around its LM head, in
    order, from :data:`HEAD_TRANSFORMS` and its (text) config; steps whose value is None are left out."""
    if getattr(_unwrapped(model), "config", None) is None:
        return []
    text = _text_config(model)
    steps = HEAD_TRANSFORMS.get(getattr(text, "model_type", None), _SOFTCAP_ONLY)
    return [(op, value) for attribute, op in steps if (value := getattr(text, attribute, None)) is not None]


# The operations of :data:`HEAD_TRANSFORMS` on the head's logits (M, V), written as the modeling code
# writes them so that half-precision rounding matches too; "divide_states" acts on the head's input.
_ON_LOGITS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "divide": lambda z, c: z / c,
    "multiply": lambda z, c: z * c,
    "softcap": lambda z, c: torch.tanh(z / c) * c,
    "truncate": lambda z, n: z[..., : int(n)],  # a vocabulary padded beyond the tokenizer's
}


def head_logits(model: nn.Module, states: Tensor) -> Tensor:
    """The LM head over hidden states (M, H) -> (M, V), with the scaling, soft cap or vocabulary cut
    the model's own forward applies (:func:`head_transforms`)."""
    steps = head_transforms(model)
    for op, value in steps:
        if op == "divide_states":
            states = states / value
    logits = decoder_and_head(model)[1](states)
    for op, value in steps:
        if op != "divide_states":
            logits = _ON_LOGITS[op](logits, value)
    return logits


def check_head(model: nn.Module, tokens: int = 8) -> None:
    """Refuse, in one line, a model whose forward computes its logits in a way :func:`head_logits`
    does not reproduce (a family missing from :data:`HEAD_TRANSFORMS`, a new transformation).

    Runs once per model (the result is kept on it): the model's own forward and the decoder + head
    path over the same ``tokens`` token ids, in eval mode so that dropout draws nothing. The ids do
    not depend on the batch, so every process of a sharded run runs the same forward.
    """
    base = _unwrapped(model)
    if getattr(base, "_dpo_lit_head_checked", False):
        return
    decoder, head = decoder_and_head(model)
    vocab = getattr(_text_config(model), "vocab_size", None) or head.weight.shape[0]
    ids = torch.arange(1, tokens + 1, device=next(base.parameters()).device)[None] % vocab  # (1, tokens)
    with evaluating(base):
        theirs = base(input_ids=ids, use_cache=False).logits[0]  # (tokens, V)
        ours = head_logits(model, decoder(input_ids=ids, use_cache=False).last_hidden_state[0])  # (tokens, V)
    # Both paths run the same operations; half-precision logits may still round differently
    # (a model that soft-caps in float32, say), while a missed scaling moves every logit.
    eps = max(torch.finfo(theirs.dtype).eps, torch.finfo(ours.dtype).eps)
    theirs, ours = theirs.float(), ours.float()
    tolerance = max(1e-4, 4 * eps) * (1 + theirs.abs().max().item())
    if ours.shape != theirs.shape or (ours - theirs).abs().max().item() > tolerance:
        difference = "a different vocabulary" if ours.shape != theirs.shape else f"{(ours - theirs).abs().max():.3g}"
        raise ConfigError(
            f"model.model_name: {type(base).__name__} ({getattr(_text_config(model), 'model_type', '?')}) transforms its "
            f"logits in its forward in a way dpo-lit's log-probs do not reproduce (logits differ by {difference}); "
            "add the transformation to dpo_lit.logps.HEAD_TRANSFORMS or use another architecture"
        )
    base._dpo_lit_head_checked = True


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, packing: str = "prefix"
) -> tuple[Tensor, Tensor, Tensor]:
    """The logits that predict completion tokens, (M, V), with their targets and rows (see
    :func:`completion_states`)."""
    states, targets, rows = completion_states(model, input_ids, attention_mask, completion_mask, packing)
    return head_logits(model, states), targets, rows


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk: int = 1024,
    options: LogpsOptions | None = None,
    packing: str = "prefix",
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of every row, and their counts.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: (N, T) prompt + completion, right-padded.
        attention_mask: (N, T), 1 on real tokens.
        completion_mask: (N, T) bool, True on completion tokens (these get scored).
        chunk: rows of the (M, V) logits handled at once by the log-softmax.
        options: what a loss asks for beyond plain sums (see :class:`LogpsOptions`).
        packing: ``"prefix"``, ``"rows"`` or ``"none"`` (see :func:`completion_states`).

    Returns:
        ``(logps, tokens)``: float32 tensors of shape (N,); ``logps`` is (N, 2) with
        ``options.aligned`` (column 1: the aligned sums).
    """
    logits, targets, rows = completion_logits(model, input_ids, attention_mask, completion_mask, packing)
    token_logps = selective_log_softmax(logits, targets, chunk)  # (M,)
    target_mask = completion_mask[:, 1:]  # (N, T-1)
    zeros = torch.zeros(len(input_ids), device=input_ids.device, dtype=torch.float32)
    tokens = target_mask.sum(-1).float()  # (N,)
    if options is None:
        return zeros.index_add(0, rows, token_logps), tokens  # (N,), (N,)
    weighted = token_logps
    if options.ld_alpha is not None:
        weighted = token_logps * ld_token_weights(target_mask, options.ld_alpha)  # (M,)
    logps = zeros.index_add(0, rows, weighted)  # (N,)
    if options.aligned:
        aligned = token_logps.detach() - log_sum_squared_probs(logits, chunk)  # (M,)
        logps = torch.stack([logps, zeros.index_add(0, rows, aligned)], dim=-1)  # (N, 2)
    return logps, tokens
