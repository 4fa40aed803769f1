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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns final-normed hidden states) and the LM head of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    return base.get_decoder(), base.get_output_embeddings()


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The logits that predict completion tokens, those tokens and the rows they belong to.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: (N, T) prompt + completion, right-padded.
        attention_mask: (N, T), 1 on real tokens.
        completion_mask: (N, T) bool, True on completion tokens (these get scored).

    Returns:
        ``(logits, targets, rows)`` of shapes (M, V), (M,), (M,) for the M completion tokens after
        the first position, logits soft-capped where the model's config asks for it.
    """
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # Position t predicts token t+1: keep the states whose next token is a completion token.
    target_mask = completion_mask[:, 1:]  # (N, T-1)
    states = hidden[:, :-1][target_mask]  # (M, H)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    logits = head(states)  # (M, V)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    return logits, targets, rows


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of every row, and their counts.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: (N, T) prompt + completion, right-padded.
        attention_mask: (N, T), 1 on real tokens.
        completion_mask: (N, T) bool, True on completion tokens (these get scored).
        chunk: rows of the (M, V) logits handled at once by the log-softmax.

    Returns:
        ``(logps, tokens)``: float32 tensors of shape (N,).
    """
    logits, targets, rows = completion_logits(model, input_ids, attention_mask, completion_mask)
    token_logps = selective_log_softmax(logits, targets, chunk)  # (M,)
    logps = torch.zeros(len(input_ids), device=input_ids.device, dtype=torch.float32)
    logps = logps.index_add(0, rows, token_logps)  # (N,)
    tokens = completion_mask[:, 1:].sum(-1).float()  # (N,)
    return logps, tokens
