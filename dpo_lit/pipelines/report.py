"""What the on-policy pipeline reports: one row per round, as a table, JSON and a PNG."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpo_lit.data.io import write_json
from dpo_lit.sampling.kl import SE_CAPTION


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
    capabilities: dict[str, dict[str, float]] = field(default_factory=dict)  # "task/metric" -> reference, policy, delta


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
    lines.append(f"({SE_CAPTION})")
    if reports[-1].capabilities:
        lines += ["", f"{'capability':<22} {'reference':>10} {'policy':>10} {'delta':>9}"]
        for name, v in reports[-1].capabilities.items():
            lines.append(f"{name:<22} {v['reference']:>10.4g} {v['policy']:>10.4g} {v['delta']:>+9.3g}")
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
    ax1.set(title="Held-out reward (mean ± SE over prompts)", xlabel="round", ylabel="reward", xticks=rounds)
    ax1.legend()
    ax2.errorbar(rounds, [x.kl for x in reports], [x.kl_se for x in reports], marker="o", capsize=4, color="C2")
    ax2.set(title="KL(π‖π_ref) on policy samples (± SE over prompts)", xlabel="round", ylabel="nats", xticks=rounds)
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report_json(reports: list[RoundReport], path: Path) -> Path:
    """All rounds so far as a JSON list (rewritten atomically after every round)."""
    return write_json([asdict(x) for x in reports], path)
