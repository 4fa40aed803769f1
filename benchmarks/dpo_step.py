"""DPO training-step throughput and peak memory: dpo-lit next to TRL 1.16, same model, pairs and settings.

    python benchmarks/dpo_step.py --model smollm2-135m-instruct --variant lora --impl both --threads 2
    python benchmarks/dpo_step.py --model tiny-random-llama --steps 3 --threads 1 --impl both  # smoke run
    python benchmarks/dpo_step.py --big-vocab --length 1024 --steps 2 --warmup 1 --no-bf16  # full, frozen copy, lr 1e-3

Each implementation runs in a fresh subprocess (so that peak RSS is its own): dpo-lit with this
interpreter (``_side_dpolit.py``), TRL with ``benchmarks/.venv-trl/bin/python`` (``_side_trl.py``).
This parent picks the pairs, writes them for both, and prints the results side by side.
See benchmarks/README.md for what is counted and what is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import Spec  # noqa: E402

DEFAULT_DATA = "hub:Anthropic/hh-rlhf?data_dir=helpful-base&split=test"  # the $DPO_LIT_DATA mirror's copy offline
DEFAULT_LR = {"lora": 2e-4, "full": 5e-6}  # configs/dpo/smollm2_hh_{lora,full}.yaml
SIDES = {"dpo-lit": "_side_dpolit.py", "trl": "_side_trl.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or .gguf file")
    p.add_argument("--variant", choices=["lora", "full"], default=None, help="default lora (full with --big-vocab)")
    p.add_argument("--impl", choices=["dpo-lit", "trl", "both"], default="both")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS) per run")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--best-precision", action="store_true",
                   help="each side at this machine's best precision: bf16 autocast where bf16 is native (AMX or "
                        "AVX512-BF16), float32 where it is emulated (dpo-lit's trainer.precision auto); overrides --bf16")
    p.add_argument("--full-reference", choices=["precomputed", "copy"], default=None,
                   help="reference of the full fine-tuning variant, default precomputed (copy with --big-vocab; "
                        "LoRA always disables its adapter)")
    p.add_argument("--packing", choices=["prefix", "rows", "none"], default="prefix",
                   help="dpo-lit's model.packing: rows packed without padding, prompts computed once (prefix)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x rows)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=384)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 (lora), 5e-6 (full), 1e-3 (--big-vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DEFAULT_DATA, help="implicit-format pairs: a file (relative to the repo root) or a hub: split")
    p.add_argument("--trl-python", default=str(HERE / ".venv-trl" / "bin" / "python"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--workdir", default=None, help="keep pairs, specs and logs here (default: a temp dir)")
    p.add_argument("--big-vocab", action="store_true",
                   help="a 2-layer Llama of width 64 with Llama-3's 128,256-token vocabulary (random weights) on "
                        "random token-id pairs: the LM head sets the memory (--model and --data are not used)")
    p.add_argument("--length", type=int, default=1024,
                   help="--big-vocab: tokens per row: a prompt of length/2 tokens, chosen and rejected completions "
                        "of length/2 each (no EOS added); max_length = length, so nothing is cut")
    p.add_argument("--fused-head", action=argparse.BooleanOptionalAction, default=True,
                   help="dpo-lit's model.fused_head (the LM head chunk by chunk, no tokens x vocabulary logits)")
    return p.parse_args(argv)


# ---- the pairs ------------------------------------------------------------------------------


def select_pairs(data: str, model_path: str, args: argparse.Namespace) -> tuple[list, dict]:
    """The first pairs of the file (in file order) that neither implementation truncates.

    TRL 1.16 has no ``max_prompt_length``: it cuts prompt + completion to ``max_length`` from the
    end, while dpo-lit cuts the prompt's start to ``max_prompt_length`` first. Keeping only pairs
    with prompt <= max_prompt_length and prompt + longer completion (with its EOS) <= max_length
    tokens (dpo-lit's tokenisation) gives both sides the same tokens.
    """
    from dpo_lit.data import DataReport, read_examples, tokenize_examples
    from dpo_lit.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    report = DataReport("skip")
    examples = read_examples([str(data)], "implicit", "paired", report)
    need = (args.warmup + args.steps) * args.batch_size
    chosen, seen = [], 0
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        seen += len(chunk)
        by_source = {e.source: e for e in chunk}
        for t in tokenize_examples(chunk, tokenizer, 10**9, None, "keep_end", DataReport("skip")):
            longest = len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"]))
            if len(t["prompt_ids"]) <= args.max_prompt_length and longest <= args.max_length:
                chosen.append(by_source[t["source"]])
        if len(chosen) >= need:
            break
    if len(chosen) < need:
        sys.exit(f"{data}: only {len(chosen)} pairs fit max_length/max_prompt_length; {need} needed")
    stats = {"read": len(examples), "skipped_bad": sum(report.skipped.values()), "scanned": seen,
             "fitting_in_scanned": len(chosen), "used": need}
    return chosen[:need], stats


def write_pairs(pairs: list, workdir: Path, seed: int) -> tuple[Path, Path]:
    """``pairs.jsonl`` (implicit format) for PreferenceDataModule; ``pairs.json`` (strings) for TRL.

    The datamodule shuffles its examples once (``split_examples`` with ``val_fraction=0``) and the
    benchmark then reads its batches in order; TRL gets the strings in that same order.
    """
    from dpo_lit.data.load import split_examples

    jsonl = workdir / "pairs.jsonl"
    with jsonl.open("w") as f:
        for e in pairs:  # prompt + completion is the original transcript (the split is a cut)
            f.write(json.dumps({"chosen": e.prompt + e.chosen, "rejected": e.prompt + e.rejected}) + "\n")
    order, _ = split_examples(pairs, 0.0, seed)
    strings = workdir / "pairs.json"
    strings.write_text(json.dumps(
        [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "source": e.source} for e in order]
    ))
    return jsonl, strings


BIG_VOCAB = 128_256  # Llama 3's
BIG_VOCAB_LR = 1e-3  # see resolve_defaults


def big_vocab_model(workdir: Path) -> str:
    """A 2-layer Llama of width 64 with a 128,256-token vocabulary and untied embeddings (as
    Llama-3-8B), random weights (seed 0), saved once for both sides, with a word-level tokenizer of
    the same vocabulary (pairs are token ids: it only names the special ids 0-2 and the size)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from dpo_lit.models import build_tiny_model

    folder = workdir / "big_vocab_model"
    model = build_tiny_model(BIG_VOCAB, seed=0)
    model.config.max_position_embeddings = 8192
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 2
    model.save_pretrained(folder)
    vocab = {f"<t{i}>": i for i in range(BIG_VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<t0>")),
        bos_token="<t0>", eos_token="<t1>", pad_token="<t2>", unk_token="<t0>",
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_token_pairs(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Random token-id pairs (seed ``args.seed``): a prompt of length/2 tokens and two completions of
    length/2, ids drawn uniformly from 3..128,000 (clear of special ids). ``pairs.jsonl`` in the
    ``tokenized`` format for PreferenceDataModule; ``pairs.json`` the same ids in its training order
    for TRL."""
    import random

    from dpo_lit.data import DataReport, read_examples
    from dpo_lit.data.load import split_examples

    rng = random.Random(args.seed)
    half = args.length // 2
    ids = lambda: [rng.randrange(3, 128_000) for _ in range(half)]  # noqa: E731
    need = (args.warmup + args.steps) * args.batch_size
    jsonl = workdir / "pairs.jsonl"
    with jsonl.open("w") as f:
        for _ in range(need):
            f.write(json.dumps({"prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()}) + "\n")
    order, _ = split_examples(read_examples([str(jsonl)], "tokenized", "paired", DataReport("raise")), 0.0, args.seed)
    strings = workdir / "pairs.json"
    strings.write_text(json.dumps([e.token_ids for e in order]))
    return jsonl, strings, {"synthetic": need, "tokens_per_row": 2 * half, "vocab": BIG_VOCAB}


def cpu_bf16() -> str:
    """What this CPU offers bf16 matmuls (dpo-lit's precision auto reads the same flags)."""
    from dpo_lit.trainer import cpu_bf16_flags

    flags = cpu_bf16_flags()
    return f"native bf16 ({', '.join(flags)})" if flags else "no native bf16 (bf16 autocast is emulated)"


# ---- the runs -------------------------------------------------------------------------------


def run_side(spec: Spec, python: str) -> dict:
    """Run one implementation in a fresh process; its log stays in its folder."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.json")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec.threads),
        "MKL_NUM_THREADS": str(spec.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "DPO_LIT_CACHE": str(out / "cache"),  # a fresh cache: the precompute is measured, not read back
        "HF_DATASETS_CACHE": str(out / "hf_datasets"),
    }
    print(f"running {spec.impl} ({spec.variant}, reference {spec.reference}) ...", flush=True)
    with (out / "log.txt").open("w") as log:
        rc = subprocess.call([python, str(HERE / SIDES[spec.impl]), str(out / "spec.json")],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = (out / "log.txt").read_text().splitlines()[-40:]
        sys.exit("\n".join([*tail, f"{spec.impl} failed (exit {rc}); full log: {out / 'log.txt'}"]))
    return json.loads((out / "result.json").read_text())


# ---- the report -----------------------------------------------------------------------------


def settings_line(args: argparse.Namespace, lr: float) -> str:
    return (
        f"settings: bf16 autocast {'on' if args.bf16 else 'off'} (each run) | gradient checkpointing off (each run) | "
        f"batch {args.batch_size} pairs = {2 * args.batch_size} rows | max_length {args.max_length} | "
        f"max_prompt_length {args.max_prompt_length} (dpo-lit; TRL 1.16 has none, pairs picked so neither "
        f"truncates) | threads {args.threads} | AdamW lr {lr:g} constant, clip 1.0 | beta {args.beta} | "
        f"seed {args.seed} | {args.warmup} warm-up + {args.steps} timed steps | dpo-lit packing {args.packing}, "
        f"fused head {'on' if args.fused_head else 'off'}"
    )


def print_table(results: list[dict], args: argparse.Namespace, lr: float) -> None:
    head = (f"{'impl':8} {'variant':7} {'reference':11} {'steps':>5} {'tokens/s':>9} {'s/step':>8} "
            f"{'peak RSS GB':>11} {'RSS@start GB':>12} {'growth GB':>9} {'tokenize s':>10} {'precompute s':>12} {'load s':>7}")
    print("\n" + head)
    for r in results:
        pre = r.get("precompute_s")
        print(f"{r['impl']:8} {r['variant']:7} {r['reference']:11} {r['timed_steps']:>5} "
              f"{r['tokens_per_s']:>9.0f} {r['s_per_step']:>8.3f} {r['peak_rss_gb']:>11.3f} "
              f"{r['setup_rss_gb']:>12.3f} {r['peak_rss_gb'] - r['setup_rss_gb']:>9.3f} {r['tokenize_s']:>10.2f} "
              f"{'-' if pre is None else f'{pre:.2f}':>12} {r['load_s']:>7.2f}")
    print(settings_line(args, lr))
    for r in results:
        run, real = sum(r["positions"]), sum(r["real_tokens"])
        print(f"{r['impl']}: {run} token positions through the model for {real} real tokens ({run / real:.2f} per "
              "real token: padding adds positions, a prompt computed once for both rows saves them)")
    print("tokens/s: real (non-padding) tokens of the chosen and rejected rows, prompt + completion"
          + (" (token ids as given, no EOS added)" if args.big_vocab else " + EOS")
          + ", over the timed steps; threads seen at the first step: "
          + ", ".join(f"{r['impl']} {r['threads']}" for r in results))
    print("read back from the running trainers: " + "; ".join(
        f"{r['impl']} precision {r['checked']['precision']}, activation checkpointing "
        f"{'ON' if r['checked']['activation_checkpointing'] else 'off'}" for r in results))
    steps = [f"w{i + 1}" for i in range(args.warmup)] + [str(i + 1) for i in range(args.steps)]
    print("\nper step".ljust(27) + "".join(f"{s:>9}" for s in steps))
    rows = [("real tokens", "real_tokens", "{:>9d}"), ("completion tokens", "completion_tokens", "{:>9d}"),
            ("positions run", "positions", "{:>9d}"), ("loss", "losses", "{:>9.4f}"),
            ("seconds", "step_seconds", "{:>9.3f}")]
    for label, key, fmt in rows:
        for r in results:
            print(f"{label:17} {r['impl']:8}" + "".join(fmt.format(v) for v in r[key]))
    if len(results) == 2:
        a, b = results
        diff = max(abs(x - y) for x, y in zip(a["real_tokens"], b["real_tokens"]))
        loss_diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        print(f"\nsame tokens per step: {'yes' if diff == 0 else f'no (largest difference {diff})'}; "
              f"{a['impl']}/{b['impl']}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
              f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak RSS; largest per-step loss difference {loss_diff:.2e}")


def resolve_defaults(args: argparse.Namespace) -> float:
    """Fill the defaults that depend on the mode; returns the learning rate.

    ``--big-vocab`` measures what the LM head costs in full fine-tuning, so it defaults to the full
    variant with a frozen-copy reference (the reference's head runs every step, as it would for a
    Llama-3 user who keeps one) and lr 1e-3, large enough on random weights that the per-step losses
    of the two sides move and their agreement means something. The other modes keep their defaults.
    """
    if args.variant is None:
        args.variant = "full" if args.big_vocab else "lora"
    if args.full_reference is None:
        args.full_reference = "copy" if args.big_vocab else "precomputed"
    if args.lr is not None:
        return args.lr
    return BIG_VOCAB_LR if args.big_vocab and args.variant == "full" else DEFAULT_LR[args.variant]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dpo_lit.models import resolve

    lr = resolve_defaults(args)
    if args.best_precision:
        from dpo_lit.trainer import cpu_bf16_flags

        args.bf16 = bool(cpu_bf16_flags())
    impls = ["dpo-lit", "trl"] if args.impl == "both" else [args.impl]
    if "trl" in impls and not Path(args.trl_python).exists():
        sys.exit(f"{args.trl_python} not found: create benchmarks/.venv-trl (make bench, or see benchmarks/README.md)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-step-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.big_vocab:
        model_path = big_vocab_model(workdir)
        args.max_length, args.max_prompt_length = args.length, args.length // 2  # nothing is cut
        jsonl, strings, selection = write_token_pairs(workdir, args)
    else:
        model_path = resolve(args.model)
        pairs, selection = select_pairs(args.data if args.data.startswith("hub:") else str(ROOT / args.data), model_path, args)
        jsonl, strings = write_pairs(pairs, workdir, args.seed)
    reference = "adapter" if args.variant == "lora" else args.full_reference
    results = []
    for impl in impls:
        spec = Spec(
            impl=impl, variant=args.variant, model_path=model_path, pairs_jsonl=str(jsonl),
            pairs_json=str(strings), out_dir=str(workdir / impl), reference=reference, steps=args.steps,
            warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, beta=args.beta, lr=lr, bf16=args.bf16,
            threads=args.threads, seed=args.seed, packing=args.packing, tokenized=args.big_vocab,
            fused_head=args.fused_head,
        )
        results.append({**run_side(spec, sys.executable if impl == "dpo-lit" else args.trl_python),
                        "spec": asdict(spec)})
    name = f"big-vocab (vocabulary {BIG_VOCAB}, width 64, 2 layers)" if args.big_vocab else args.model
    print(f"\nmodel {name} ({model_path}); pairs: {selection}; CPU: {cpu_bf16()}"
          + (f"; best precision here: {'bf16 autocast' if args.bf16 else 'float32'}" if args.best_precision else ""))
    print_table(results, args, lr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"model": "big-vocab" if args.big_vocab else args.model, "settings": settings_line(args, lr),
             "selection": selection, "results": results}, indent=1))
        print(f"wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
