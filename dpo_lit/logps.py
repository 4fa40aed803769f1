"""Per-sequence log-probabilities of completions, from one forward pass over a batch of rows.

A DPO step needs ``sum_t log π(y_t | x, y_<t)`` over the completion tokens of every row (chosen and
rejected rows sit in the same batch, so one forward serves both). With real vocabularies the LM
head, not the decoder, sets peak memory: (M × V) logits for M scored tokens are 0.5 GB per 1k tokens
of a 128,256-token vocabulary in float32, the logits' gradient as much again. Here:

1. the decoder runs once and returns hidden states (2B, T, H);
2. only the hidden states that predict a completion token are kept, (M, H) with M ≪ 2B·T;
3. the head and the log-softmax run fused, chunk by chunk (:func:`head_outputs`,
   :class:`_FusedHead`): the forward keeps each row's float32 log-normaliser only, the backward
   recomputes a chunk's logits and turns them into the gradients of the hidden states and the head
   weight at once. No (M × V) tensor is saved or allocated; the price is the head's matmul run
   twice (as Liger's fused linear cross-entropy does for a scalar loss; here the upstream gradient
   of every token's log-prob comes from a pluggable loss, hence the recomputation).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from dpo_lit.errors import ConfigError
from dpo_lit.models import evaluating
from dpo_lit.packing import PACKING, Unpackable, check_packable, layout, packed_hidden
from dpo_lit.sharding import in_forward

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


# ---- the fused head ----------------------------------------------------------------------------
# Elements of one chunk's (rows × V) logits: 2**25 float32 values are 128 MB, so a chunk's few
# float32 temporaries stay well under a GB whatever the vocabulary (682 rows at 49k, 261 at 128k).
CHUNK_ELEMENTS = 1 << 25


def chunk_rows(vocab: int, chunk: int | None = None) -> int:
    """Rows of (rows × ``vocab``) logits computed at once: ``chunk`` if given, else
    :data:`CHUNK_ELEMENTS` // ``vocab``."""
    return max(1, chunk if chunk is not None else CHUNK_ELEMENTS // max(vocab, 1))


@dataclass
class HeadOutputs:
    """Per scored token, (M,) each: the target's log-prob (differentiable) and, where asked, the
    distribution's entropy, ``log Σ_v p_v²`` and whether the target is the most likely token
    (no gradient; None where not asked)."""

    logps: Tensor
    entropy: Tensor | None = None
    log_sum_sq: Tensor | None = None
    is_argmax: Tensor | None = None


# Elementwise operations on a chunk's logits (after the head's matmul), each with its derivative
# written from its output: ``(value, output) -> d output / d input``.
_DERIVATIVE: dict[str, Callable[[float, Tensor], Tensor | float]] = {
    "divide": lambda c, z: 1.0 / c,
    "multiply": lambda c, z: c,
    "softcap": lambda c, z: 1 - (z / c) ** 2,  # z = c·tanh(u / c)
}


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a linear layer over ``weight`` computes in here: autocast's where it is on."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _chunk_logits(states: Tensor, weight: Tensor, bias: Tensor | None, ops, dtype: torch.dtype) -> Tensor:
    """``ops(states @ weight.T + bias)`` for one chunk, in ``dtype`` as the model's head and forward
    compute them (the matmul in autocast's dtype, the scalings on its output)."""
    z = torch.nn.functional.linear(states.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    for op, value in ops:
        z = _ON_LOGITS[op](z, value)
    return z


class _FusedHead(torch.autograd.Function):
    """``log_softmax(ops(states @ W.T + b))[i, target_i]`` without an (M × V) tensor.

    Forward computes the logits chunk by chunk and keeps only each row's float32 log-normaliser;
    backward recomputes a chunk's logits and turns d/dz_j = g·(1[j = target] − p_j) into
    d(states) and d(W), d(b) right away. Saved: the inputs and (M,) floats.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, ops, rows, stats):
        dtype = _compute_dtype(weight)
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 in gradcheck
        m = len(states)
        lse = states.new_empty(m, dtype=acc)
        picked = states.new_empty(m, dtype=acc)
        extra = {name: states.new_empty(m, dtype=torch.bool if name == "is_argmax" else acc) for name in stats}
        with torch.autocast(weight.device.type, enabled=False), torch.no_grad():
            w = weight.to(dtype)  # one cast for all chunks (autocast would cast per call)
            for start in range(0, m, rows):
                sl = slice(start, start + rows)
                z = _chunk_logits(states[sl], w, bias, ops, dtype).to(acc)  # (r, V)
                lse[sl] = torch.logsumexp(z, dim=-1)
                picked[sl] = z.gather(-1, targets[sl, None]).squeeze(-1)
                if "entropy" in extra:
                    extra["entropy"][sl] = lse[sl] - (torch.softmax(z, dim=-1) * z).sum(-1)
                if "log_sum_sq" in extra:
                    extra["log_sum_sq"][sl] = torch.logsumexp(2 * z, dim=-1) - 2 * lse[sl]
                if "is_argmax" in extra:
                    extra["is_argmax"][sl] = z.argmax(-1) == targets[sl]
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.ops, ctx.rows, ctx.dtype = ops, rows, dtype
        outputs = tuple(extra[name] for name in stats)
        ctx.mark_non_differentiable(*outputs)
        return (picked - lse, *outputs)

    @staticmethod
    def backward(ctx, grad, *_):
        states, weight, bias, targets, lse = ctx.saved_tensors
        dtype, acc = ctx.dtype, lse.dtype
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_states = torch.empty_like(states) if need_states else None
        # float32 accumulation across chunks, as one matmul would accumulate
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, acc)) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=grad_weight.dtype if need_weight else acc) if need_bias else None
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, len(states), ctx.rows):
                sl = slice(start, start + ctx.rows)
                s = states[sl].to(dtype)
                z = torch.nn.functional.linear(s, w, None if bias is None else bias.to(dtype))  # (r, V) pre-ops
                derivative = 1.0
                for op, value in ctx.ops:
                    z = _ON_LOGITS[op](z, value)
                    derivative = derivative * _DERIVATIVE[op](value, z.to(acc))
                g = grad[sl, None].to(acc)
                dz = torch.exp(z.to(acc) - lse[sl, None]).mul_(-g)  # (r, V): g·(1[target] − p)
                dz.scatter_add_(-1, targets[sl, None], g)
                dz = (dz * derivative).to(dtype)
                if need_states:
                    grad_states[sl] = (dz @ w).to(states.dtype)
                if need_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(dz.T, s)
                    else:
                        grad_weight += dz.T @ s
                if need_bias:
                    grad_bias += dz.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None, None, None


STATS = ("entropy", "log_sum_sq", "is_argmax")


def fused_head(
    states: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ops: Sequence[tuple[str, float]] = (),
    chunk: int | None = None, stats: Sequence[str] = (),
) -> HeadOutputs:
    """Log-probs of ``targets`` (M,) under ``ops(states @ weight.T + bias)``, chunk by chunk.

    Args:
        states: (M, H) hidden states.
        weight, bias: the LM head's (V, H) weight and (V,) bias (or None).
        targets: (M,) token ids.
        ops: elementwise ``(operation, value)`` steps on the logits (``divide``, ``multiply``,
            ``softcap``), in order.
        chunk: rows computed at once (None: :func:`chunk_rows`).
        stats: any of :data:`STATS`, computed without gradient.
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown head statistics {sorted(unknown)}; expected some of {STATS}")
    stats = tuple(name for name in STATS if name in stats)
    rows = chunk_rows(weight.shape[0], chunk)
    logps, *extra = _FusedHead.apply(states, weight, bias, targets, tuple(ops), rows, stats)
    return HeadOutputs(logps, **dict(zip(stats, extra)))


def _plain_head(model, states, targets, temperature, chunk, stats) -> HeadOutputs:
    """:func:`head_outputs` through the head module itself: (M × V) logits held for the backward."""
    logits = head_logits(model, states)
    if temperature != 1.0:
        logits = logits / temperature
    rows = chunk_rows(logits.shape[-1], chunk)
    out = HeadOutputs(selective_log_softmax(logits, targets, rows))
    with torch.no_grad():
        if "entropy" in stats:
            out.entropy = torch.cat([_entropy(z.float()) for z in logits.split(rows)])
        if "log_sum_sq" in stats:
            out.log_sum_sq = log_sum_squared_probs(logits, rows)
        if "is_argmax" in stats:
            out.is_argmax = logits.argmax(-1) == targets
    return out


def _entropy(z: Tensor) -> Tensor:
    return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)


def head_outputs(
    model: nn.Module, states: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk: int | None = None,
    stats: Sequence[str] = (), fused: bool = True,
) -> HeadOutputs:
    """The model's LM head over hidden states (M, H): each target's log-prob under
    softmax(logits / ``temperature``), with the family's own head steps (:func:`head_transforms`),
    and the ``stats`` asked for (:data:`STATS`).

    With ``fused`` (and a plain ``nn.Linear`` head, the case of every Hugging Face causal LM) no
    (M × V) tensor is kept or allocated at once (:func:`fused_head`); otherwise the head module
    computes all M rows of logits, held for the backward.
    """
    head = decoder_and_head(model)[1]
    if not fused or type(head) is not nn.Linear:
        return _plain_head(model, states, targets, temperature, chunk, stats)
    weight, bias, ops = head.weight, head.bias, []
    for op, value in head_transforms(model):
        if op == "divide_states":
            states = states / value
        elif op == "truncate":
            weight, bias = weight[: int(value)], None if bias is None else bias[: int(value)]
        else:
            ops.append((op, value))
    if temperature != 1.0:
        ops.append(("divide", temperature))
    return fused_head(states, weight, bias, targets, ops, chunk, stats)


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
    chunk: int | None = None,
    options: LogpsOptions | None = None,
    packing: str = "prefix",
    fused: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of every row, and their counts.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: (N, T) prompt + completion, right-padded.
        attention_mask: (N, T), 1 on real tokens.
        completion_mask: (N, T) bool, True on completion tokens (these get scored).
        chunk: rows of logits computed at once (None: as many as fit :data:`CHUNK_ELEMENTS`).
        options: what a loss asks for beyond plain sums (see :class:`LogpsOptions`).
        packing: ``"prefix"``, ``"rows"`` or ``"none"`` (see :func:`completion_states`).
        fused: compute the LM head chunk by chunk, forward and backward, never holding the
            (M × V) logits (:func:`head_outputs`); False keeps them for the backward.
        temperature: log-probs of softmax(logits / ``temperature``), the distribution sampling at
            that temperature draws from.

    Returns:
        ``(logps, tokens)``: float32 tensors of shape (N,); ``logps`` is (N, 2) with
        ``options.aligned`` (column 1: the aligned sums).
    """
    return in_forward(model, _completion_logps, input_ids, attention_mask, completion_mask, chunk, options, packing,
                      fused, temperature)  # fmt: skip


def _completion_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk: int | None,
    options: LogpsOptions | None, packing: str, fused: bool, temperature: float,
) -> tuple[Tensor, Tensor]:
    states, targets, rows = completion_states(model, input_ids, attention_mask, completion_mask, packing)
    aligned = options is not None and options.aligned
    stats = ("log_sum_sq",) if aligned else ()
    head = head_outputs(model, states, targets, chunk=chunk, stats=stats, fused=fused, temperature=temperature)
    token_logps = head.logps  # (M,)
    target_mask = completion_mask[:, 1:]  # (N, T-1)
    zeros = torch.zeros(len(input_ids), device=input_ids.device, dtype=torch.float32)
    tokens = target_mask.sum(-1).float()  # (N,)
    if options is None:
        return zeros.index_add(0, rows, token_logps), tokens  # (N,), (N,)
    weighted = token_logps
    if options.ld_alpha is not None:
        weighted = token_logps * ld_token_weights(target_mask, options.ld_alpha)  # (M,)
    logps = zeros.index_add(0, rows, weighted)  # (N,)
    if aligned:
        aligned_logps = token_logps.detach() - head.log_sum_sq  # (M,)
        logps = torch.stack([logps, zeros.index_add(0, rows, aligned_logps)], dim=-1)  # (N, 2)
    return logps, tokens
