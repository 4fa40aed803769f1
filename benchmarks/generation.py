"""Generation throughput and peak memory of ``dpo_lit.sampling.sample``: what rollouts, on-policy pairs and
sampled KL cost.

    python benchmarks/generation.py --model big-vocab --rows 16 --new-tokens 512 --threads 2
    python benchmarks/generation.py --model smollm2-135m-instruct --rows 16 --new-tokens 128 --threads 2
    python benchmarks/generation.py --model smollm2-135m-instruct --rows 4 --samples 4 --prompt-tokens 256 \
        --new-tokens 32 --no-share-prompts         # k samples of a prompt: the prompt encoded k times, or once

Run it in a fresh process per measurement (peak RSS is the process's). ``big-vocab`` is a 2-layer
Llama of width 64 with Llama-3's 128,256-token vocabulary and random weights, where the logits of
every step, not the model, set the memory: keeping them all (``output_logits``) holds rows × steps ×
vocabulary float32 values until the end; taking each step's log-prob as it goes holds one step's.
To measure an older checkout, put it first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path


def model_and_eos(name: str, seed: int):
    """The model, its EOS id, and its vocabulary size."""
    from dpo_lit.models import build_tiny_model, load_model

    if name == "big-vocab":
        model = build_tiny_model(128_256, seed=seed)
        model.config.max_position_embeddings = 4096
        return model, 128_001, 128_256  # Llama-3's <|end_of_text|>: as likely as any token here
    model = load_model(name)
    return model, model.config.eos_token_id, model.config.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="big-vocab", help="big-vocab, or an alias / folder / .gguf of dpo-lit's load_model")
    p.add_argument("--rows", type=int, default=16, help="prompts, --samples each, in one generate call")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="encode a prompt once and share its KV cache among its samples (sample's share_prompts)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from dpo_lit.sampling.sample import sample

    torch.set_num_threads(args.threads)
    model, eos, vocab = model_and_eos(args.model, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, min(vocab, 32_000), (args.rows, args.prompt_tokens), generator=g).tolist()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    start = time.perf_counter()
    samples = sample(
        model, None, prompts, args.samples, args.new_tokens, temperature=args.temperature,
        batch_size=args.rows * args.samples, seed=args.seed, eos_token_id=eos, pad_token_id=0,
        share_prompts=args.share_prompts,
    )
    seconds = time.perf_counter() - start
    generated = sum(len(s.completion_ids) for s in samples)
    source = Path(__import__("dpo_lit").__file__).parent  # the checkout measured (PYTHONPATH may name another)
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "model": args.model, "vocab": vocab, "rows": args.rows, "samples": args.samples, "share_prompts": args.share_prompts,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
        "generated_tokens": generated, "seconds": round(seconds, 2), "tokens_per_s": round(generated / seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "rss_before_generate_gb": round(before, 2), "mean_logp": round(sum(s.logp for s in samples) / len(samples), 4),
        "dpo_lit": str(source), "commit": commit,
    }))


if __name__ == "__main__":
    main()
