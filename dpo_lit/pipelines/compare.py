"""DPO and PPO from the same model on the same task, measured the same way (``make compare``).

    dpo-lit compare --config configs/compare/everyday_vader.yaml

- **DPO** is the quickstart's recipe: ``dpo-lit predict`` samples 4 answers per training prompt
  and pairs the best and worst by reward, ``dpo-lit fit`` trains DPO with LoRA on the pairs;
- **PPO** is ``dpo-lit fit`` with a :class:`~dpo_lit.rlhf.PPOModule` config: rollouts on the same
  training prompts scored by the same reward, a KL penalty to the same starting model.

Each stage runs in its own process, so its wall time and peak resident memory are its own
(``os.wait4``'s rusage of that child). Then both trained models and the starting model answer the
held-out prompts with the same seeds, exactly as the quickstart measures: mean reward ± SE, the
paired per-prompt gain over the starting model ± SE, and KL(π‖π_ref) from the policy's own samples.
The starting model's samples are drawn once and shared by both comparisons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.data.io import DataSource, write_json
from dpo_lit.data.prompts import read_prompts
from dpo_lit.jobs import Stage, override_args, run_stage
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.pipelines.onpolicy import compare_on_prompts
from dpo_lit.rewards import Reward, VaderSentiment
from dpo_lit.sampling.kl import SE_CAPTION


@dataclass
class MethodRow:
    """One method measured on the held-out prompts (``reference``: the starting model itself)."""

    method: str
    reward: float
    reward_se: float
    paired_gain: float
    paired_gain_se: float
    kl: float
    kl_se: float
    seconds: float
    peak_rss_gb: float
    model: str


def newest_export(root: Path) -> Path:
    """The exported model of the newest run under ``root`` (each fit adds a ``version_N``): the
    merged one under LoRA, else the full model."""
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    found = ExportPretrained.exported(versions[-1]) if versions else None
    if found is not None and (found / "config.json").is_file():
        return found
    raise SystemExit(f"dpo-lit compare: no full model exported under {root}/lightning_logs (with LoRA: export.merge)")


def format_rows(rows: list[MethodRow]) -> str:
    lines = ["", f"{'method':<10}{'reward':>16}{'paired gain':>18}{'KL nats':>15}{'seconds':>10}{'peak RSS':>10}"]
    for r in rows:
        lines.append(
            f"{r.method:<10}{r.reward:>9.3f} ± {r.reward_se:.3f}{r.paired_gain:>+11.3f} ± {r.paired_gain_se:.3f}"
            f"{r.kl:>9.2f} ± {r.kl_se:.2f}{r.seconds:>10.0f}{r.peak_rss_gb:>8.2f} GB"
        )
    return "\n".join([*lines, f"({SE_CAPTION})"])


def write_rows_png(rows: list[MethodRow], path: Path) -> Path:
    """Held-out reward, paired gain and KL per method (± SE), with each method's wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.method for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (key, title) in zip(axes, [("reward", "held-out reward"), ("paired_gain", "paired gain over the start"),
                                       ("kl", "KL(π‖π_ref), nats")]):  # fmt: skip
        ax.bar(names, [getattr(r, key) for r in rows], yerr=[getattr(r, f"{key}_se") for r in rows],
               color=colors, capsize=4)  # fmt: skip
        ax.set_title(f"{title} (± SE over prompts)")
        ax.axhline(0, color="black", linewidth=0.6)
    for i, r in enumerate(rows):
        if r.seconds:
            axes[0].annotate(f"{r.seconds / 60:.0f} min, {r.peak_rss_gb:.1f} GB", (i, 0), ha="center",
                             va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_compare(
    generate_config: DataSource = "configs/generate/everyday_vader.yaml",
    dpo_config: DataSource = "configs/quickstart/dpo.yaml",
    ppo_config: DataSource = "configs/ppo/smollm2_everyday_vader.yaml",
    reward: Reward | None = None,
    heldout_prompts: DataSource = "dpo_lit/assets/everyday_prompts_heldout.txt",
    model_name: str = "smollm2-135m-instruct",
    out_dir: str = "runs/compare",
    eval_samples: int = 4,
    eval_max_new_tokens: int = 48,
    eval_seed: int = 1234,
    seed: int = 1,
) -> list[MethodRow]:
    """Train DPO and PPO from ``model_name``, then measure both against it on held-out prompts.

    Args:
        generate_config: ``dpo-lit predict`` config of DPO's pairs (prompts, reward, sampling).
        dpo_config: ``dpo-lit fit`` config of DPO (its data files become the generated pairs).
        ppo_config: ``dpo-lit fit`` config of PPO (a ``PPOModule`` with the same prompts and reward).
        reward: reward of the held-out measurement (None: VADER compound, as both configs).
        heldout_prompts: prompts neither method trained on.
        model_name: the starting model of both methods, and the reference they are measured against.
        out_dir: where pairs, runs, ``report.json`` and ``report.png`` go.
        eval_samples: samples per held-out prompt and model.
        eval_max_new_tokens: length of the evaluation samples.
        eval_seed: sampling seed of the evaluation (the same for every model).
        seed: seed of DPO's generation and of both trainings.
    """
    out = Path(out_dir)
    prompts = read_prompts(heldout_prompts)  # a bad prompt file fails before anything trains
    pairs = out / "dpo" / "pairs.jsonl"
    common = {"model.model_name": model_name, "seed_everything": seed, "trainer.enable_model_summary": False}
    print(f"[dpo] generate: pairs for the training prompts ({generate_config}) → {pairs}", flush=True)
    generate = run_stage(["predict", "--config", generate_config, *override_args(
        {"model.model_name": model_name, "model.seed": seed, "output.path": str(pairs)})])  # fmt: skip
    print(f"[dpo] train: {dpo_config}", flush=True)
    dpo = run_stage(["fit", "--config", dpo_config, *override_args(
        {**common, "data.train_files": [str(pairs)], "trainer.default_root_dir": str(out / "dpo")})])  # fmt: skip
    print(f"[ppo] train: {ppo_config}", flush=True)
    ppo = run_stage(["fit", "--config", ppo_config, *override_args(
        {**common, "trainer.default_root_dir": str(out / "ppo")})])  # fmt: skip
    trained = [
        ("dpo", newest_export(out / "dpo"), Stage(generate.seconds + dpo.seconds, max(generate.peak_rss_gb, dpo.peak_rss_gb))),
        ("ppo", newest_export(out / "ppo"), ppo),
    ]  # fmt: skip

    print(f"[evaluate] {len(prompts)} held-out prompts × {eval_samples} samples: start, DPO, PPO", flush=True)
    reward = reward or VaderSentiment()
    tokenizer, reference = load_tokenizer(model_name), load_model(model_name)
    rows, reference_samples = [], None
    for method, path, stage in trained:
        result = compare_on_prompts(
            reference, load_model(str(path)), tokenizer, prompts, reward, eval_samples, eval_max_new_tokens,
            eval_seed, reference_samples,
        )
        reference_samples = result["reference_samples"]
        if not rows:
            rows.append(MethodRow("reference", *result["reference"], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, model_name))
        rows.append(MethodRow(method, *result["policy"], *result["gain"], *result["kl"], stage.seconds,
                              stage.peak_rss_gb, str(path)))  # fmt: skip
        example = result["examples"][0]
        print(f"  {method}: {example['prompt']!r} → {example['policy']!r}", flush=True)
    write_json([asdict(r) for r in rows], out / "report.json")
    write_rows_png(rows, out / "report.png")
    print(format_rows(rows), f"\n\nreport: {out / 'report.json'}, {out / 'report.png'}", sep="\n", flush=True)
    return rows
