"""What ``dpo-lit frontier`` reports: ``frontier.csv``, ``frontier.png``, the table of last points,
and ``judged.csv``, which re-reads every run's saved held-out samples.

``judged.csv`` has, for every evaluation point of every run:

- the classifier reward's gain over the SFT model, **paired by prompt**: the mean over held-out
  prompts of (the run's mean reward on that prompt − the SFT model's), ± the SE over prompts. That
  is the SE of the difference itself. Combining the two marginal SEs of ``frontier.csv``
  (√(SE₁² + SE₂²)) treats the runs as independent and overstates it where the policies are close;
- a **second judge**, independent of the classifier: VADER's compound polarity (a rule-based
  lexicon, nothing trained on IMDb) of prefix + completion, ± SE, and its paired gain. A policy
  that games the classifier gains on the classifier and not on VADER.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_lit.data.io import atomic_write
from dpo_lit.rewards import VaderSentiment
from dpo_lit.rewards.classifier import clean_review, read_reviews
from dpo_lit.sampling.kl import SE_CAPTION, mean_se

COLUMNS = ("method", "setting", "step", "reward", "reward_se", "kl", "kl_se")
JUDGED_COLUMNS = (
    "method", "setting", "step", "kl", "reward", "reward_gain", "reward_gain_se", "vader", "vader_se", "vader_gain",
    "vader_gain_se",
)  # fmt: skip


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] = COLUMNS) -> Path:
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_frontier_csv(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [
            {**row, "step": int(row["step"]), **{k: float(row[k]) for k in COLUMNS[3:]}} for row in csv.DictReader(f)
        ]


METHOD_COLORS = {"dpo": "Blues", "ppo-gt": "Reds", "ppo-rm": "Oranges", "preferred-ft": "Greens", "sft": "Greys",
                 "rloo": "Purples", "grpo": "YlOrBr"}  # fmt: skip


def write_frontier_png(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Reward against KL(π‖π_SFT), paper-style: a line through each run's points in step order,
    from the SFT model (the point at KL 0) on, coloured by method, with bars of ± one SE over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault((row["method"], row["setting"]), []).append(row)
    markers = "osD^vP*X"
    start = runs.get(("sft", ""), [])[:1]  # every run starts at the SFT model: its lines start there
    for (method, setting), points in runs.items():
        points = sorted(points, key=lambda r: r["step"])
        line = start + points if method != "sft" else points
        same = [s for m, s in runs if m == method]
        shade = 0.85 - 0.45 * same.index(setting) / max(1, len(same) - 1)  # a method's settings: shades of its colour
        color = plt.get_cmap(METHOD_COLORS.get(method, "Purples"))(1.0 if method == "sft" else shade)
        ax.errorbar(
            [p["kl"] for p in line], [p["reward"] for p in line],
            xerr=[p["kl_se"] for p in line], yerr=[p["reward_se"] for p in line],
            color=color, marker=markers[same.index(setting) % len(markers)], markersize=5, linewidth=1,
            elinewidth=0.6, capsize=2, alpha=0.85, label=f"{method} {setting}".strip(),
        )  # fmt: skip
    ax.set_xlabel("KL(π ‖ π_SFT), nats per completion (sampled)")
    ax.set_ylabel("reward: classifier P(positive) (held-out prefixes)")
    ax.set_title(f"{title or 'IMDb sentiment: reward vs KL'}\n(bars: {SE_CAPTION})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def last_points(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last point of each run, in the order the runs first appear."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["method"], row["setting"])
        if key not in last or row["step"] >= last[key]["step"]:
            last[key] = row
    return list(last.values())


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The last point of each run: reward and KL ± SE, and the paired gains and VADER when the rows
    are ``judged.csv``'s."""
    judged = bool(rows) and "reward_gain" in rows[0]
    head = f"{'method':<14}{'setting':<15}{'step':>5}{'reward':>17}{'KL nats':>16}"
    lines = ["", head + (f"{'paired gain':>19}{'VADER gain':>19}" if judged else "")]
    for r in last_points(rows):
        line = f"{r['method']:<14}{r['setting']:<15}{r['step']:>5}{r['reward']:>10.3f}"
        line += f" ± {r['reward_se']:.3f}{r['kl']:>9.2f} ± {r['kl_se']:.2f}" if "reward_se" in r else " " * 24
        if judged:
            line += f"{r['reward_gain']:>+11.3f} ± {r['reward_gain_se']:.3f}{r['vader_gain']:>+11.3f} ± {r['vader_gain_se']:.3f}"
        lines.append(line)
    return "\n".join([*lines, f"({SE_CAPTION})"])


def paired_gain(values: dict[int, list[float]], base: dict[int, list[float]]) -> tuple[float, float]:
    """Mean ± SE over prompts of (mean of ``values`` − mean of ``base``) on each prompt."""
    if values.keys() != base.keys():
        raise ValueError("paired_gain: the two evaluations cover different prompts")
    return mean_se([sum(values[p]) / len(values[p]) - sum(base[p]) / len(base[p]) for p in sorted(values)])


def vader_accuracy(test_file: str, limit: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How often VADER's compound score has the sign of the IMDb label (``limit`` random test reviews)."""
    texts, labels = read_reviews(test_file, limit, seed)
    scores = VaderSentiment()([""] * len(texts), texts, None)
    right = sum((float(s) > 0) == bool(y) for s, y in zip(scores, labels, strict=True))
    return {"judge": "VADER compound (rule-based lexicon)", "test_accuracy": right / len(texts), "test_examples": len(texts)}


def judge_samples(samples_dir: Path) -> list[dict[str, Any]]:
    """``judged.csv``'s rows from the held-out samples each run saved (``samples_dir/*.jsonl``, one
    :class:`~dpo_lit.callbacks.reward_kl.HeldoutSample` a line; ``sft-point.jsonl`` is the base)."""
    base_file = samples_dir / "sft-point.jsonl"
    if not base_file.is_file():
        return []
    vader = VaderSentiment()

    def by_step(path: Path) -> dict[int, list[dict]]:
        with path.open() as f:
            records = [json.loads(line) for line in f]
        texts = [clean_review(r["prompt"] + r["completion"]) for r in records]
        for r, score in zip(records, vader([""] * len(texts), texts, None), strict=True):
            r["vader"] = float(score)
        steps: dict[int, list[dict]] = {}
        for r in records:
            steps.setdefault(r["step"], []).append(r)
        return steps

    def per_prompt(records: list[dict], key: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for r in records:
            out.setdefault(r["prompt_index"], []).append(r[key])
        return out

    runs = {path: by_step(path) for path in sorted(samples_dir.glob("*.jsonl"), key=lambda f: (f != base_file, f.name))}
    base_records = next(iter(runs[base_file].values()))
    base = {key: per_prompt(base_records, key) for key in ("reward", "vader")}
    rows = []
    for steps in runs.values():
        for step, records in sorted(steps.items()):
            prompts = [r["prompt_index"] for r in records]  # standard errors over prompts
            reward, _ = mean_se([r["reward"] for r in records], prompts)
            vader_mean, vader_se = mean_se([r["vader"] for r in records], prompts)
            reward_gain = paired_gain(per_prompt(records, "reward"), base["reward"])
            vader_gain = paired_gain(per_prompt(records, "vader"), base["vader"])
            rows.append({
                "method": records[0]["method"], "setting": records[0]["setting"], "step": step,
                "kl": mean_se([r["log_ratio"] for r in records], prompts)[0], "reward": reward,
                "reward_gain": reward_gain[0], "reward_gain_se": reward_gain[1],
                "vader": vader_mean, "vader_se": vader_se, "vader_gain": vader_gain[0], "vader_gain_se": vader_gain[1],
            })  # fmt: skip
    return rows
