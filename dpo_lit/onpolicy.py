"""On-policy DPO end to end: generate pairs → fit → measure, for one or more rounds.

    python -m dpo_lit.onpolicy --config configs/quickstart/pipeline.yaml            # make quickstart
    python -m dpo_lit.onpolicy --config configs/quickstart/pipeline.yaml --rounds 3  # iterative DPO

Each round runs ``dpo-lit predict`` (the current model samples k answers per training prompt, a
reward object scores them, best vs worst become pairs) and ``dpo-lit fit`` (DPO with LoRA on those
pairs; the merged model becomes the next round's sampler). After each round the policy and the
original reference answer the held-out prompts with the same seeds (paired comparison): mean
reward of each, their per-prompt difference with its standard error, and KL(π‖π_ref) estimated on
the policy's own samples (temperature 1, no top-p: an unbiased sequence-level estimate).
Everything lands in ``out_dir``: pairs, TensorBoard logs, ``report.json``, ``report.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jsonargparse import CLI

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.cli import run as cli_run
from dpo_lit.generate import prompt_text
from dpo_lit.generation import Sample, encode_prompts, read_prompts, sample
from dpo_lit.kl import kl_from_samples
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.plots import plot_run
from dpo_lit.rewards import Reward


@dataclass
class RoundReport:
    """What one round measured on the held-out prompts (rewards are means over all samples)."""

    round: int
    model: str
    pairs: int
    reference_reward: float
    reference_reward_se: float
    policy_reward: float
    policy_reward_se: float
    paired_gain: float  # mean over prompts of (policy − reference) per-prompt mean reward
    paired_gain_se: float
    kl: float
    kl_se: float
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n)) if n > 1 else 0.0


def score_samples(reward: Reward, prompts: list, samples: list[Sample]) -> torch.Tensor:
    texts = [prompt_text(prompts[s.prompt_index]) for s in samples]
    return reward(texts, [s.text for s in samples], [s.finished for s in samples])


def compare_on_prompts(
    reference, policy, tokenizer, prompts: list, reward: Reward, num_samples: int, max_new_tokens: int, seed: int
) -> dict:
    """Paired comparison of two models on the same prompts and sampling seeds, plus sampled KL."""
    ids = encode_prompts(tokenizer, prompts)
    ref_samples = sample(reference, tokenizer, ids, num_samples, max_new_tokens, seed=seed)
    pol_samples = sample(policy, tokenizer, ids, num_samples, max_new_tokens, seed=seed)
    ref_scores = score_samples(reward, prompts, ref_samples)
    pol_scores = score_samples(reward, prompts, pol_samples)
    gain = (pol_scores - ref_scores).view(len(prompts), num_samples).mean(-1)  # (P,) per-prompt means
    kl = kl_from_samples(pol_samples, reference, pad_token_id=tokenizer.pad_token_id)
    examples = [
        {"prompt": prompt_text(prompts[i]), "reference": ref_samples[i * num_samples].text,
         "policy": pol_samples[i * num_samples].text}
        for i in range(min(2, len(prompts)))
    ]
    return {
        "reference": mean_se(ref_scores), "policy": mean_se(pol_scores), "gain": mean_se(gain),
        "kl": (kl.mean, kl.stderr), "examples": examples,
    }


def _train(model: str, pairs: Path, train_config: str, root: Path, seed: int) -> Path:
    cli = cli_run([
        "fit", "--config", train_config, f"--model.model_name={model}", f"--data.train_files=[{pairs}]",
        f"--trainer.default_root_dir={root}", f"--seed_everything={seed}",
    ])
    return ExportPretrained.run_dir(cli.trainer)


def run_pipeline(
    generate_config: str = "configs/quickstart/generate.yaml",
    train_config: str = "configs/quickstart/dpo.yaml",
    reward: Reward | None = None,
    train_prompts: str | None = None,
    heldout_prompts: str = "dpo_lit/assets/everyday_prompts_heldout.txt",
    model_name: str = "smollm2-135m-instruct",
    rounds: int = 1,
    out_dir: str = "runs/quickstart",
    eval_samples: int = 4,
    eval_max_new_tokens: int = 48,
    eval_seed: int = 1234,
    seed: int = 0,
) -> list[RoundReport]:
    """Generate → fit → evaluate, ``rounds`` times.

    Args:
        generate_config: ``dpo-lit predict`` config (prompts, reward, sampling).
        train_config: ``dpo-lit fit`` config (loss, LoRA, optimiser); its data files are replaced.
        reward: reward for the held-out evaluation (None: VADER compound, as the generate config).
        train_prompts: prompts to generate pairs for (None: the generate config's prompts file).
        heldout_prompts: prompts never trained on, for the evaluation.
        model_name: the starting model, and the reference every round is compared with.
        rounds: rounds of iterative DPO (each samples from the previous round's policy).
        out_dir: where pairs, logs and the report go.
        eval_samples: samples per held-out prompt and model.
        eval_max_new_tokens: length of the evaluation samples.
        eval_seed: sampling seed of the evaluation (the same for reference and policy).
        seed: seed of generation and training (round r uses seed + r).
    """
    from dpo_lit.rewards import VaderSentiment

    reward = reward or VaderSentiment()
    out = Path(out_dir)
    prompts = read_prompts(heldout_prompts)
    tokenizer = load_tokenizer(model_name)
    reference = load_model(model_name)
    reports, current = [], model_name
    for r in range(1, rounds + 1):
        t0 = time.time()
        pairs = out / f"round{r}" / "pairs.jsonl"
        overrides = [f"--data.prompts_file={train_prompts}"] if train_prompts else []
        cli_run([
            "predict", "--config", generate_config, f"--model.model_name={current}",
            f"--output.path={pairs}", f"--model.seed={seed + r}", *overrides,
        ])
        t1 = time.time()
        run_dir = _train(current, pairs, train_config, out / f"round{r}", seed + r)
        plot_run(run_dir)  # training curves: <run_dir>/plots/*.png
        current = str(run_dir / "merged")
        t2 = time.time()
        result = compare_on_prompts(
            reference, load_model(current), tokenizer, prompts, reward, eval_samples, eval_max_new_tokens, eval_seed
        )
        t3 = time.time()
        reports.append(RoundReport(
            round=r, model=current, pairs=sum(1 for _ in pairs.open()),
            reference_reward=result["reference"][0], reference_reward_se=result["reference"][1],
            policy_reward=result["policy"][0], policy_reward_se=result["policy"][1],
            paired_gain=result["gain"][0], paired_gain_se=result["gain"][1],
            kl=result["kl"][0], kl_se=result["kl"][1], examples=result["examples"],
            seconds={"generate": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2},
        ))
        (out / "report.json").write_text(json.dumps([asdict(x) for x in reports], indent=2) + "\n")
        print(format_report(reports, run_dir))
    write_report_png(reports, out / "report.png")
    return reports


def format_report(reports: list[RoundReport], run_dir: Path | None = None) -> str:
    """The terminal table, two example completions and where to look next."""
    lines = [
        "", f"{'round':>5} {'pairs':>5} {'reference reward':>18} {'policy reward':>16} "
        f"{'paired gain':>16} {'KL(pi||ref) nats':>17}",
    ]
    for x in reports:
        lines.append(
            f"{x.round:>5} {x.pairs:>5} {x.reference_reward:>10.3f} ± {x.reference_reward_se:.3f} "
            f"{x.policy_reward:>8.3f} ± {x.policy_reward_se:.3f} {x.paired_gain:>+8.3f} ± {x.paired_gain_se:.3f} "
            f"{x.kl:>9.2f} ± {x.kl_se:.2f}"
        )
    for ex in reports[-1].examples:
        lines += ["", f"prompt:    {ex['prompt']}", f"reference: {ex['reference']!r}", f"policy:    {ex['policy']!r}"]
    if run_dir is not None:
        lines += [
            "", f"training curves: {run_dir / 'plots'}/*.png",
            f"TensorBoard:     .venv/bin/tensorboard --logdir {run_dir.parent}",
        ]
    return "\n".join(lines)


def write_report_png(reports: list[RoundReport], path: Path) -> Path:
    """Held-out reward (reference vs policy, ± SE) and KL per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [x.round for x in reports]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.errorbar(rounds, [x.reference_reward for x in reports], [x.reference_reward_se for x in reports],
                 marker="o", capsize=4, label="reference")
    ax1.errorbar(rounds, [x.policy_reward for x in reports], [x.policy_reward_se for x in reports],
                 marker="o", capsize=4, label="DPO policy")
    ax1.set(title="Held-out reward (mean ± SE)", xlabel="round", ylabel="reward", xticks=rounds)
    ax1.legend()
    ax2.errorbar(rounds, [x.kl for x in reports], [x.kl_se for x in reports], marker="o", capsize=4, color="C2")
    ax2.set(title="KL(π‖π_ref) on policy samples (± SE)", xlabel="round", ylabel="nats", xticks=rounds)
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    CLI(run_pipeline, as_positional=False)


if __name__ == "__main__":
    main()
