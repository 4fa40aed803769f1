"""Every method from the same model on the same task, at the same budget, measured the same way.

    dpo-lit compare --config configs/compare/tiny.yaml              # 7 methods on the tiny model
    dpo-lit compare --config configs/compare/everyday_vader.yaml    # DPO and PPO on SmolLM2 (make compare)
    dpo-lit compare --config configs/compare/tiny.yaml --seeds '[1, 2, 3]'

``methods`` lists the methods, each a ``dpo-lit fit`` config:

- an **offline** method (DPO, IPO, KTO, ...) trains on preference pairs made from the start model's
  own samples: ``dpo-lit predict`` samples ``generate_samples`` completions of each training prompt
  with ``generate_config``, scored by ``reward``, and pairs them; the pairs are made once per seed
  and shared by every offline method;
- an **online** method (PPO, RLOO, GRPO, online DPO) samples its rollouts on the same training
  prompts, scored by the same ``reward``, during its fit.

**The budget is sampled completions**: every method samples as many completions from a policy as
the offline methods' pairs took (training prompts × ``generate_samples``, or ``budget``); an online
method's fit stops after the batch that reaches it (:class:`~dpo_lit.callbacks.RolloutBudget`), and
the report gives the count each reached. Wall time and peak RSS are measured too, per method (its
own processes; an offline method's include the generation of its pairs).

Each fit runs in its own process (``os.wait4``'s rusage). Then every trained model and the start
model answer the held-out prompts with the same seeds: mean reward ± SE, the paired per-prompt gain
over the start model ± SE, KL(π‖π_ref) from the policy's own samples, and the win rate against the
start model by ``judge`` (default: the reward as a judge) ± SE, every SE over prompts. With several
``seeds`` each seed trains every method again (and makes its own pairs), and the summary gives each
method's mean ± standard error across seeds.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.data.io import DataSource, write_json
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.errors import ConfigError
from dpo_lit.jobs import Stage, override_args, run_stage
from dpo_lit.judges import Judge, RewardJudge
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.rewards import Reward
from dpo_lit.sampling.kl import SE_CAPTION, mean_se
from dpo_lit.sampling.measure import MeasureSpec, measure, paired_gain, win_rate


@dataclass
class Method:
    """One method of a comparison.

    Args:
        name: its name in the report.
        config: its ``dpo-lit fit`` config.
        offline: it trains on the pairs made from the start model's samples (else it samples its own
            rollouts: an online method).
        overrides: dotted-key overrides of its config, as on the command line (e.g.
            ``{"model.loss": "dpo_lit.losses.IPOLoss", "model.loss.beta": 0.1}``).
    """

    name: str
    config: DataSource
    offline: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodRow:
    """One method measured on the held-out prompts (``reference``: the start model itself)."""

    method: str
    seed: int
    reward: float
    reward_se: float
    paired_gain: float
    paired_gain_se: float
    kl: float
    kl_se: float
    win_rate: float
    win_rate_se: float
    completions: int
    seconds: float
    peak_rss_gb: float
    model: str


SUMMARY = ("reward", "paired_gain", "kl", "win_rate", "seconds", "peak_rss_gb")


def instantiate(config: dict[str, Any]) -> Any:
    """The object a ``{class_path, init_args}`` config names (nested configs too)."""
    module, _, name = config["class_path"].rpartition(".")
    args = {k: instantiate(v) if isinstance(v, dict) and "class_path" in v else v
            for k, v in (config.get("init_args") or {}).items()}  # fmt: skip
    return getattr(importlib.import_module(module), name)(**args)


def newest_export(root: Path) -> Path:
    """The exported model of the newest run under ``root`` (each fit adds a ``version_N``): the
    merged one under LoRA, else the full model."""
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    found = ExportPretrained.exported(versions[-1]) if versions else None
    if found is not None and (found / "config.json").is_file():
        return found
    raise SystemExit(f"dpo-lit compare: no full model exported under {root}/lightning_logs (with LoRA: export.merge)")


def summarize(rows: list[MethodRow]) -> list[dict[str, Any]]:
    """Per method, in order: each of :data:`SUMMARY`'s metrics as the mean over seeds ± its standard
    error across seeds (``nan`` with one seed), and the seeds."""
    methods = list(dict.fromkeys(r.method for r in rows))
    summary = []
    for method in methods:
        mine = [r for r in rows if r.method == method]
        entry: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for key in SUMMARY:
            mean, se = mean_se([getattr(r, key) for r in mine])
            entry[key], entry[f"{key}_se"] = mean, se
        summary.append(entry)
    return summary


def format_rows(rows: list[MethodRow]) -> str:
    lines = ["", f"{'method':<12}{'seed':>5}{'reward':>16}{'paired gain':>18}{'KL nats':>15}{'win rate':>16}"
                 f"{'completions':>12}{'seconds':>9}{'peak RSS':>10}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r.method:<12}{r.seed:>5}{r.reward:>9.3f} ± {r.reward_se:.3f}{r.paired_gain:>+11.3f} ± {r.paired_gain_se:.3f}"
            f"{r.kl:>9.2f} ± {r.kl_se:.2f}{r.win_rate:>9.3f} ± {r.win_rate_se:.3f}{r.completions:>12}"
            f"{r.seconds:>9.0f}{r.peak_rss_gb:>7.2f} GB"
        )
    return "\n".join([*lines, f"({SE_CAPTION})"])


def format_summary(summary: list[dict[str, Any]]) -> str:
    lines = ["", f"across seeds (mean ± standard error of the seeds' values, {summary[0]['seeds']} seeds)",
             f"{'method':<12}" + "".join(f"{k.replace('_', ' '):>20}" for k in SUMMARY)]  # fmt: skip
    for s in summary:
        lines.append(f"{s['method']:<12}" + "".join(f"{s[k]:>11.3f} ± {s[k + '_se']:<6.3f}" for k in SUMMARY))
    return "\n".join(lines)


def write_summary_png(summary: list[dict[str, Any]], path: Path) -> Path:
    """Held-out reward, paired gain, KL and win rate per method (mean over seeds, ± SE), and each
    method's reward against its KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["method"] for s in summary]
    colors = [f"C{i}" for i in range(len(summary))]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    panels = [("reward", "held-out reward"), ("paired_gain", "paired gain over the start"), ("kl", "KL(π‖π_ref), nats"),
              ("win_rate", "win rate against the start")]  # fmt: skip
    for ax, (key, title) in zip(axes, panels):
        values = [s[key] for s in summary]
        errors = [0.0 if math.isnan(s[f"{key}_se"]) else s[f"{key}_se"] for s in summary]
        ax.bar(names, values, yerr=errors, color=colors, capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.axhline(0.5 if key == "win_rate" else 0, color="black", linewidth=0.6)
    ax = axes[-1]
    for s, color in zip(summary, colors):
        ax.errorbar(s["kl"], s["reward"], xerr=None if math.isnan(s["kl_se"]) else s["kl_se"],
                    yerr=None if math.isnan(s["reward_se"]) else s["reward_se"], fmt="o", color=color, label=s["method"])  # fmt: skip
    ax.set(title="reward against KL", xlabel="KL(π‖π_ref), nats", ylabel="held-out reward")
    ax.legend(fontsize=7)
    fig.suptitle(f"mean over {summary[0]['seeds']} seed(s) ± SE across seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(
    methods: list[Method],
    reward: dict[str, Any],
    generate_config: DataSource = "configs/generate/everyday_vader.yaml",
    train_prompts: DataSource = "dpo_lit/assets/everyday_prompts_train.txt",
    heldout_prompts: DataSource = "dpo_lit/assets/everyday_prompts_heldout.txt",
    model_name: str = "smollm2-135m-instruct",
    judge: Judge | None = None,
    generate_samples: int = 4,
    budget: int | None = None,
    out_dir: str = "runs/compare",
    eval_samples: int = 4,
    eval_max_new_tokens: int = 48,
    eval_seed: int = 1234,
    seeds: list[int] = [1],  # noqa: B006 (jsonargparse reads the default)
) -> list[MethodRow]:
    """Train every method from ``model_name`` for each seed, then measure all against it.

    Args:
        methods: the methods compared (:class:`Method`: name, fit config, offline or not, overrides).
        reward: the task's reward, as a ``{class_path, init_args}`` config: it scores the offline
            methods' samples, the online methods' rollouts and the held-out measurement.
        generate_config: ``dpo-lit predict`` config of the offline methods' pairs (sampling settings).
        train_prompts: the prompts every method trains on.
        heldout_prompts: prompts no method trained on, for the measurement.
        model_name: the start model of every method, and the reference it is measured against.
        judge: compares a method's held-out sample with the start model's (None: ``reward`` as a
            judge, :class:`~dpo_lit.judges.RewardJudge`).
        generate_samples: completions of each training prompt the offline methods' pairs are made from.
        budget: completions each method may sample (None: training prompts × ``generate_samples``).
        out_dir: where pairs, runs, ``report.json`` and ``report.png`` go.
        eval_samples: samples per held-out prompt and model.
        eval_max_new_tokens: length of the evaluation samples.
        eval_seed: sampling seed of the evaluation (the same for every model and seed).
        seeds: training seeds; each trains every method again (and makes its pairs again).
    """
    if not methods or len({m.name for m in methods}) != len(methods):
        raise ConfigError("methods: give at least one method, each with its own name")
    out = Path(out_dir)
    train, heldout = read_prompts(train_prompts), read_prompts(heldout_prompts)  # bad files fail before training
    budget = budget or len(train) * generate_samples
    scorer = instantiate(reward)
    if not isinstance(scorer, Reward):
        raise ConfigError(f"reward: {reward['class_path']} is not a dpo_lit.rewards.Reward")
    judge = judge or RewardJudge(scorer)
    rows: list[MethodRow] = []
    tokenizer, start = load_tokenizer(model_name), load_model(model_name)
    ids = encode_prompts(tokenizer, heldout)
    spec = MeasureSpec(eval_samples, eval_max_new_tokens, seed=eval_seed)
    baseline = measure(start, tokenizer, heldout, ids, spec, scorer)  # the start model's answers, once
    for seed in seeds:
        trained = train_methods(methods, seed, out / f"seed{seed}", model_name, reward, generate_config, train_prompts,
                                generate_samples, budget)  # fmt: skip
        print(f"[evaluate] seed {seed}: {len(heldout)} held-out prompts × {eval_samples} samples, every method", flush=True)
        rows.append(MethodRow("reference", seed, baseline.reward, baseline.reward_se, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0,
                              0.0, 0.0, model_name))  # fmt: skip
        for name, (path, stage, completions) in trained.items():
            policy = measure(load_model(str(path)), tokenizer, heldout, ids, spec, scorer, reference=start)
            rows.append(MethodRow(name, seed, policy.reward, policy.reward_se, *paired_gain(policy, baseline),
                                  policy.kl.mean, policy.kl.stderr, *win_rate(policy, baseline, judge, heldout),
                                  completions, stage.seconds, stage.peak_rss_gb, str(path)))  # fmt: skip
    summary = summarize(rows)
    write_json({"rows": [asdict(r) for r in rows], "summary": summary, "budget": budget}, out / "report.json")
    write_summary_png(summary, out / "report.png")
    print(format_rows(rows), format_summary(summary), f"\nreport: {out / 'report.json'}, {out / 'report.png'}",
          sep="\n", flush=True)  # fmt: skip
    return rows


def train_methods(
    methods: list[Method], seed: int, out: Path, model_name: str, reward: dict[str, Any], generate_config: str,
    train_prompts: str, generate_samples: int, budget: int,
) -> dict[str, tuple[Path, Stage, int]]:
    """One seed: the pairs (when an offline method needs them), then every method's fit in its own
    process; each method's export, its stages' time and peak RSS, and the completions it sampled."""
    common = {"model.model_name": model_name, "seed_everything": seed, "trainer.enable_model_summary": False}
    pairs, generated = out / "pairs.jsonl", Stage(0.0, 0.0)
    generated_count = len(read_prompts(train_prompts)) * generate_samples
    if any(m.offline for m in methods):
        print(f"[pairs] seed {seed}: {generate_samples} samples of each training prompt ({generate_config}) → {pairs}",
              flush=True)  # fmt: skip
        generated = run_stage(["predict", "--config", generate_config, *override_args({
            "model.model_name": model_name, "model.seed": seed, "model.reward": reward,
            "model.num_samples": generate_samples, "data.prompts_file": train_prompts, "data.limit": None,
            "output.path": str(pairs),
        })])  # fmt: skip
    trained = {}
    for method in methods:
        root = out / method.name
        if method.offline:
            overrides = {**common, "data.train_files": [str(pairs)], "trainer.default_root_dir": str(root)}
        else:  # its rollouts on the same prompts and reward, until it has sampled the budget
            overrides = {**common, "model.reward": reward, "data.prompts_file": train_prompts, "trainer.max_steps": -1,
                         "trainer.max_epochs": 10_000, "trainer.default_root_dir": str(root),
                         "trainer.callbacks+": "dpo_lit.callbacks.RolloutBudget", "trainer.callbacks.completions": budget}  # fmt: skip
        print(f"[{method.name}] seed {seed}: {method.config}", flush=True)
        stage = run_stage(["fit", "--config", method.config, *override_args({**overrides, **method.overrides})])
        if method.offline:
            stage = Stage(generated.seconds + stage.seconds, max(generated.peak_rss_gb, stage.peak_rss_gb))
        completions = generated_count if method.offline else sampled(root)
        trained[method.name] = (newest_export(root), stage, completions)
    return trained


def sampled(root: Path) -> int:
    """The completions an online method's run sampled (its last ``train/sampled``)."""
    from dpo_lit.pipelines.plots import read_scalars

    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    points = read_scalars(versions[-1]).get("train/sampled", []) if versions else []
    return int(points[-1][1]) if points else 0
