"""Padding-free forwards with prompts computed once: the rows of a batch packed into one sequence.

A right-padded DPO batch holds every prompt twice (once before the chosen and once before the
rejected completion) and, on HH-RLHF, more padding than text. Here the real tokens of a batch are
laid out as one sequence instead, prompt by prompt::

    [prompt_1, chosen_1, rejected_1, prompt_2, chosen_2, rejected_2, ...]

and attention is computed segment by segment:

- ``prompt + chosen``: causal, as in its padded row;
- ``rejected``: each token sees the prompt and the rejected tokens before it, never the chosen
  ones; its positions continue from the prompt's end, as in its padded row.

Every hidden state is then the one its padded row computes (up to floating-point summation order),
with no padding and no second pass over the prompt: "prefix sharing" (Wang & Hegde 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"). Rows that share no prompt with
another (or ``share_prompts=False``) become segments of their own: plain padding-free packing.

Rows share a prompt when the tokens before their first completion token are the same: a DPO pair's
two rows, KTO's matched and mismatched rows, the choices of a multiple-choice question.

Mechanics: the decoder runs with ``position_ids`` and no attention mask, and each attention layer
receives the layout through a keyword argument, which Hugging Face models pass down to their
attention function. :func:`_sdpa_or_segments` is registered as transformers' ``"sdpa"`` attention:
without the keyword it is transformers' own SDPA function, unchanged; with it, it attends segment by
segment (so does a gradient-checkpointing recomputation, which replays the layers with the same
keywords). For the packed forward itself, an SDPA model's attention implementation is
:data:`IMPLEMENTATION`, the same function registered with no mask function, so that transformers
builds no mask (from packed ``position_ids`` it would build a dense (1, 1, L, L) one, 0.6 GB at
L = 24k, that the segments never read). Each segment is one
:func:`~torch.nn.functional.scaled_dot_product_attention` call without a mask tensor: causal, or,
for a segment after a shared prompt, the bottom-right causal bias
(:func:`torch.nn.attention.bias.causal_lower_right`), which a GPU runs with its fused kernels where
a boolean mask would send it to the math kernel. A model that does not route its attention through
that function (eager or flash attention, or an architecture with its own attention code), asks for attention the
segments do not reproduce (a sliding window, a soft cap), or mixes positions outside attention (the
state-space or convolution layers of a hybrid model, found by :func:`check_packable` before its
first packed forward) falls back to padded rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from dpo_lit.models import evaluating

PACKING = ("prefix", "rows", "none")
KWARG = "dpo_lit_segments"
IMPLEMENTATION = "dpo_lit_segments"  # the attention implementation of packed forwards


@dataclass
class Segment:
    """Queries at packed positions ``[start, end)``; keys and values: ``prefix`` (a packed range,
    a shared prompt) followed by the same ``[start, end)``, causal within it: every query sees the
    whole prefix (the bottom-right causal pattern)."""

    start: int
    end: int
    prefix: tuple[int, int] | None = None


@dataclass
class Layout:
    """How a padded batch (N, T) maps to one packed sequence of L real tokens.

    Attributes:
        input_ids: (1, L) the packed tokens.
        position_ids: (1, L) each token's position in its padded row (less left padding).
        where: (N, T) long, the packed index of each real token of each row, -1 on padding.
        segments: in packed order, covering [0, L) once.
        calls: attention layers that used the layout in the last forward (0: the model ignores it).
    """

    input_ids: Tensor
    position_ids: Tensor
    where: Tensor
    segments: list[Segment]
    calls: int = field(default=0)


def layout(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, share_prompts: bool = True) -> Layout | None:
    """The packed layout of a batch, or None where a row's real tokens are not one contiguous run.

    A row's prompt is its real tokens before its first completion token. With ``share_prompts``,
    a row whose prompt (at least one token) equals an earlier row's keeps only its completion and
    what follows it, attending to the earlier row's prompt.
    """
    n, t = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(-1).tolist()
    starts = real.int().argmax(-1).tolist()  # first real position (0 when right-padded)
    firsts = torch.where(completion_mask.any(-1), completion_mask.int().argmax(-1), t).tolist()
    ids_rows = input_ids.tolist()
    where = torch.full((n, t), -1, dtype=torch.long)
    prompts: dict[tuple[int, ...], int] = {}  # prompt tokens -> their packed start
    segments, src, pos = [], [], []
    offset = 0
    for i in range(n):
        s, length = starts[i], lengths[i]
        if length == 0:
            continue
        if not bool(real[i, s : s + length].all()):
            return None
        plen = max(min(firsts[i], s + length) - s, 0)  # prompt tokens of row i
        key = tuple(ids_rows[i][s : s + plen]) if share_prompts and plen > 0 else None
        p_start = prompts.get(key) if key is not None else None
        if p_start is not None and plen < length:  # the prompt is already packed: only the rest
            rest = length - plen
            where[i, s : s + plen] = torch.arange(p_start, p_start + plen)
            where[i, s + plen : s + length] = torch.arange(offset, offset + rest)
            segments.append(Segment(offset, offset + rest, (p_start, p_start + plen)))
            src.append(i * t + torch.arange(s + plen, s + length))
            pos.append(torch.arange(plen, length))
            offset += rest
            continue
        if key is not None:
            prompts[key] = offset
        where[i, s : s + length] = torch.arange(offset, offset + length)
        segments.append(Segment(offset, offset + length))
        src.append(i * t + torch.arange(s, s + length))
        pos.append(torch.arange(length))
        offset += length
    if not segments:
        return None
    device = input_ids.device
    return Layout(
        input_ids=input_ids.reshape(-1)[torch.cat(src).to(device)][None],
        position_ids=torch.cat(pos).to(device)[None],
        where=where.to(device),
        segments=segments,
    )


def _segment_attention(
    query: Tensor, key: Tensor, value: Tensor, plan: Layout, dropout: float, scaling: float | None
) -> Tensor:
    """Attention over the layout's segments; query (1, Hq, L, D), key/value (1, Hkv, L, D) ->
    (1, L, Hq, D)."""
    gqa = query.shape[1] != key.shape[1]
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast casts SDPA's inputs (RoPE leaves q, k float32, v bf16)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    outs = []
    for seg in plan.segments:
        q = query[:, :, seg.start : seg.end]
        k, v = key[:, :, seg.start : seg.end], value[:, :, seg.start : seg.end]
        if seg.prefix is None:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            a, b = seg.prefix
            k = torch.cat([key[:, :, a:b], k], dim=2)
            v = torch.cat([value[:, :, a:b], v], dim=2)
            bias = causal_lower_right(seg.end - seg.start, k.shape[2])  # query i sees keys up to i + prefix length
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


class Unpackable(Exception):
    """The decoder cannot compute packed rows as its padded rows; the message says why."""


def _sdpa_or_segments(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' SDPA attention, or, given a :class:`Layout` under :data:`KWARG`, attention
    segment by segment."""
    plan = kwargs.pop(KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise Unpackable(f"uses attention with {unsupported}, which packed segments do not reproduce")
    plan.calls += 1
    return _segment_attention(query, key, value, plan, kwargs.get("dropout", 0.0), kwargs.get("scaling")), None


AttentionInterface.register("sdpa", _sdpa_or_segments)
AttentionInterface.register(IMPLEMENTATION, _sdpa_or_segments)  # and no mask function: no mask is built


def _configs(config) -> Iterator:
    """A config and its sub-configs (a multimodal model's text config, ...), recursively."""
    yield config
    for key in getattr(config, "sub_configs", {}):
        if (sub := getattr(config, key, None)) is not None:
            yield from _configs(sub)


@contextlib.contextmanager
def _packed_attention(decoder: nn.Module) -> Iterator[None]:
    """An SDPA decoder's attention implementation is :data:`IMPLEMENTATION` inside; each config's
    own setting is restored after. Other implementations are left as they are (and do not pack)."""
    config = getattr(decoder, "config", None)
    if config is None or config._attn_implementation != "sdpa":
        yield
        return
    saved = [(c, c._attn_implementation_internal) for c in _configs(config)]
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        for c, implementation in saved:
            c._attn_implementation_internal = implementation


def packed_hidden(decoder: nn.Module, plan: Layout) -> Tensor:
    """The decoder's final hidden states of the packed sequence, (1, L, H).

    Raises:
        Unpackable: the model did not use the layout (its attention does not go through
            transformers' SDPA function) or asks for attention the segments do not reproduce.
    """
    plan.calls = 0
    with _packed_attention(decoder):
        hidden = decoder(
            input_ids=plan.input_ids, position_ids=plan.position_ids, use_cache=False, **{KWARG: plan}
        ).last_hidden_state
    if plan.calls == 0:
        raise Unpackable("does not run its attention through transformers' SDPA function")
    return hidden


def check_packable(decoder: nn.Module) -> None:
    """Raise :class:`Unpackable` when a packed row's hidden states depend on the row packed before
    it: a layer outside attention (a state-space or convolution layer of a hybrid model) carries
    state along the packed sequence. Runs once per decoder (the result is kept on it).

    The same second row is packed after two different first rows; the segment attention keeps
    them apart, so with attention as the only sequence mixing its states differ by rounding only.
    """
    if getattr(decoder, "_dpo_lit_packable", False):
        return
    embeddings = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", 32)
    device = next(decoder.parameters()).device
    second = []
    for first in (range(1, 7), range(7, 13)):
        ids = torch.tensor([list(first), list(range(13, 19))], device=device) % vocab  # (2, 6)
        ones = torch.ones_like(ids)
        plan = layout(ids, ones, torch.zeros_like(ids, dtype=torch.bool), share_prompts=False)
        with evaluating(decoder):
            second.append(packed_hidden(decoder, plan)[0, plan.where[1]].float())  # (6, H)
    eps = torch.finfo(compute_dtype(decoder)).eps
    tolerance = max(1e-4, 8 * eps) * (1 + second[0].abs().max().item())
    if (second[0] - second[1]).abs().max().item() > tolerance:
        raise Unpackable("carries state across positions outside attention (a state-space or convolution layer)")
    decoder._dpo_lit_packable = True


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module computes in: autocast's where it is on, else its first floating parameter's."""
    device = next(module.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
