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

A loss may ask for more than plain sums through :class:`LogpsOptions` (LD-DPO's token weights,
WPO's aligned log-probs); without options the computation is exactly the above.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from dpo_lit.packing import PACKING, layout, packed_hidden


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
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
    decoder, _ = decoder_and_head(model)
    # Position t predicts token t+1: keep the states whose next token is a completion token.
    target_mask = completion_mask[:, 1:]  # (N, T-1)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    plan = None
    if packing != "none" and not getattr(decoder, "_dpo_lit_unpackable", False):
        plan = layout(input_ids, attention_mask, completion_mask, share_prompts=packing == "prefix")
    if plan is not None:
        hidden = packed_hidden(decoder, plan)  # (1, L, H)
        if hidden is not None:
            return hidden[0][plan.where[:, :-1][target_mask]], targets, rows  # (M, H)
        decoder._dpo_lit_unpackable = True
        warnings.warn(
            f"{type(decoder).__name__} does not run its attention through transformers' SDPA function: "
            "its rows are computed padded (set model.packing: none to silence this)", stacklevel=2
        )
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, :-1][target_mask], targets, rows


def head_logits(model: nn.Module, states: Tensor) -> Tensor:
    """The LM head over hidden states (M, H) -> (M, V), soft-capped where the model's config asks."""
    logits = decoder_and_head(model)[1](states)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


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
