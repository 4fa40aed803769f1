"""``dpo-lit sweep``: a grid of config overrides, each point a normal run, one table at the end.

    dpo-lit sweep --config configs/dpo/tiny.yaml --grid model.loss.init_args.beta=0.05,0.1,0.5 --out_dir runs/sweep
    dpo-lit sweep --config configs/dpo/tiny.yaml --grid model.loss=DPOLoss,IPOLoss --seeds 0,1 --out_dir runs/losses
    dpo-lit sweep --command onpolicy --config experiments/beta_ablation/pipeline.yaml \
        --grid beta=0.01,0.05,0.1,0.3,1.0 --out_dir runs/beta_ablation

Each point of the cartesian grid (times ``--seeds``) is the plain ``dpo-lit`` command it would be
by hand, run in its own process into ``OUT_DIR/<point>/``; ``OUT_DIR/commands.txt`` lists those
commands, so any scheduler (a SLURM array, a Ray job) can run the points on many machines and a
later ``dpo-lit sweep`` call only gathers them. Points run one after another here.

- **Resumable**: a point that finished has ``OUT_DIR/<point>/done.json`` and is skipped, as is a
  point whose command finished outside the sweep (its fit exported the model, its pipeline wrote
  ``report.json``); a point cut off is run again from the start.
- **Shared work**: what the project caches on disk is computed once for all points: precomputed
  reference log-probs (keyed by a hash of the weights, precision and tokenised data, so a β sweep
  with ``reference: precomputed`` computes them for its first point only), converted models and,
  for ``onpolicy``, what depends only on the starting model: round 1's pairs, the reference's
  evaluation samples and capability scores (``$DPO_LIT_CACHE``). Each point tokenises its data again
  (seconds for the configs here).
- **Summary**: ``OUT_DIR/summary.csv`` has one row per point: the grid values, the seed, each
  ``val/`` metric's final and best value (``cap/`` too; best is the lowest for losses, perplexities,
  bits per byte, NLL and KL, the highest for accuracies and rewards, a capability delta's that of
  its metric, and not given for metrics without a direction: :mod:`dpo_lit.metrics`) from the
  run's TensorBoard log (for ``onpolicy``, the report's reward, paired gain, KL and capability
  deltas), and the seconds the point took; ``OUT_DIR/summary.png`` plots each metric against the
  first grid key, mean and range over seeds (and, for ``onpolicy``, reward against KL).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.data.io import atomic_write, write_json
from dpo_lit.errors import ConfigError
from dpo_lit.jobs import command_parser, parse_command, run_stage
from dpo_lit.metrics import better


@dataclass
class Point:
    """One run of the sweep: its overrides, seed and folder name."""

    values: dict[str, Any]
    seed: int

    @property
    def name(self) -> str:
        parts = [f"{key.split('.')[-1]}={_short(value)}" for key, value in self.values.items()]
        return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join([*parts, f"seed={self.seed}"]))


def _short(value: Any) -> str:
    """A value as a folder-name part: a file by its stem, a dotted class path by its class, else JSON."""
    if isinstance(value, str):
        return Path(value).stem if "/" in value else value.rsplit(".", 1)[-1]
    return json.dumps(value)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["KEY=v1,v2", ...]`` -> ``{KEY: [v1, v2]}``; each value read as YAML (0.1 a number, DPOLoss a string)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid: expected KEY=v1,v2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--grid: {key} given twice")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def parse_fixed(items: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``, each value read as YAML (commas are part of it)."""
    fixed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        if key in fixed:
            raise ConfigError(f"--set: {key} given twice")
        fixed[key] = yaml.safe_load(value)
    return fixed


def grid_points(grid: dict[str, list[Any]], seeds: Sequence[int]) -> list[Point]:
    """The cartesian product of the grid, each with every seed, in order."""
    return [
        Point(dict(zip(grid, combo)), seed) for combo in itertools.product(*grid.values()) for seed in seeds
    ]


def point_args(
    command: str, configs: Sequence[str], point: Point, out: Path, fixed: dict[str, Any] | None = None
) -> list[str]:
    """The ``dpo-lit`` arguments of one point: the configs, the ``fixed`` overrides every point shares
    (not part of its folder name), then the point's own values."""
    args = [command, *(arg for config in configs for arg in ("--config", config))]
    values = {key: v if isinstance(v, str) else json.dumps(v) for key, v in {**(fixed or {}), **point.values}.items()}
    args += [f"--{key}={value}" for key, value in values.items()]
    if command == "onpolicy":
        return [*args, f"--seed={point.seed}", f"--out_dir={out}"]
    return [*args, f"--seed_everything={point.seed}", f"--trainer.default_root_dir={out}"]


def fit_metrics(out: Path) -> dict[str, float]:
    """Final and best of every ``val/`` and ``cap/`` scalar of the newest run under ``out``."""
    from dpo_lit.pipelines.plots import read_scalars

    versions = sorted((out / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        return {}
    metrics: dict[str, float] = {}
    for tag, points in read_scalars(versions[-1]).items():
        if not tag.startswith(("val/", "cap/")) or not points:
            continue
        values = [v for _, v in points]
        metrics[f"{tag}/final"] = values[-1]
        direction = summary_direction(tag)
        if direction is not None:  # a metric without a direction (rewards/chosen, kto_z0) has no best
            metrics[f"{tag}/best"] = min(values) if direction == "lower" else max(values)
    return metrics


def summary_direction(tag: str) -> Literal["higher", "lower"] | None:
    """Which way the summary's best of ``tag`` lies: its metric's (:func:`dpo_lit.metrics.better`).

    A capability delta (``cap/<task>/<metric>_delta``, policy − reference) goes its metric's way (the
    lowest ``bits_per_byte_delta``, the highest ``acc_delta``); the reference's own score (``_ref``)
    and a metric without a direction have none (None: no best is reported, rather than a guess).
    """
    return better(tag.removesuffix("_delta"))


def onpolicy_metrics(out: Path) -> dict[str, float]:
    """The last round's held-out reward, paired gain and KL from the pipeline's report."""
    rows = json.loads((out / "report.json").read_text())
    last = rows[-1]
    keys = ("policy_reward", "policy_reward_se", "paired_gain", "paired_gain_se", "kl", "kl_se")
    capabilities = {
        f"cap/{name}{suffix}": values[part]
        for name, values in last.get("capabilities", {}).items()
        for part, suffix in (("policy", ""), ("delta", "_delta"))
    }
    return {**{key: last[key] for key in keys}, **capabilities}


def finished_elsewhere(folder: Path, command: str) -> bool:
    """Whether a point's own command (run by hand or by a scheduler from commands.txt) completed:
    a fit exported its model at the end, a pipeline wrote its report."""
    if command == "onpolicy":
        return (folder / "report.json").is_file()
    return any(ExportPretrained.exported(run) for run in folder.glob("lightning_logs/version_*"))


def write_summary_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_summary_png(rows: list[dict[str, Any]], x_key: str, path: Path) -> Path:
    """Each metric against the first grid key: the mean over seeds, with their range; an on-policy
    sweep's held-out reward against its KL as well, each point labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in rows[0] if k.endswith(("/final", "_delta")) or k in ("policy_reward", "paired_gain", "kl")]
    metrics = [m for m in metrics if all(isinstance(r.get(m), float) and math.isfinite(r[m]) for r in rows)]
    xs = list(dict.fromkeys(r[x_key] for r in rows))
    numeric = all(isinstance(x, (int, float)) for x in xs)
    frontier = "kl" in metrics and "policy_reward" in metrics  # an on-policy sweep: reward against KL too
    panels = len(metrics) + frontier
    cols = min(3, max(1, panels))
    lines = math.ceil(max(1, panels) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.5 * cols, 3.5 * lines), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        groups = [[r[metric] for r in rows if r[x_key] == x] for x in xs]
        means = [sum(g) / len(g) for g in groups]
        positions = xs if numeric else list(range(len(xs)))
        ax.plot(positions, means, marker="o")
        ax.fill_between(positions, [min(g) for g in groups], [max(g) for g in groups], alpha=0.2)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(positions, [str(x) for x in xs], rotation=20)
        ax.set(title=metric.removesuffix("/final"), xlabel=x_key.split(".")[-1])
    if frontier:
        ax = axes.flat[len(metrics)]
        ax.scatter([r["kl"] for r in rows], [r["policy_reward"] for r in rows])
        for r in rows:
            ax.annotate(f"{x_key.split('.')[-1]}={r[x_key]}", (r["kl"], r["policy_reward"]), fontsize=7)
        ax.set(title="held-out reward against KL", xlabel="KL(π‖π_ref), nats", ylabel="reward")
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(
    configs: Sequence[str], grid: dict[str, list[Any]], seeds: Sequence[int], out_dir: str, command: str = "fit",
    fixed: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every point not yet done, then write ``summary.csv`` and ``summary.png``. ``fixed``
    overrides go to every point (``--set``), without entering the folder names."""
    out = Path(out_dir)
    fixed = fixed or {}
    if clash := sorted(set(fixed) & set(grid)):
        raise ConfigError(f"--set: {', '.join(clash)} is also in --grid; give it in one of them")
    points = grid_points(grid, seeds)
    if len({p.name for p in points}) != len(points):
        raise ConfigError("--grid: two points get the same folder name; use values that differ in their last part")
    commands = [shlex.join(["dpo-lit", *point_args(command, configs, p, out / p.name, fixed)]) for p in points]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "commands.txt") as tmp:
        tmp.write_text("\n".join(commands) + "\n")
    rows = []
    for i, point in enumerate(points, 1):
        folder, done = out / point.name, out / point.name / "done.json"
        if done.is_file():
            print(f"[{i}/{len(points)}] {point.name}: done before, skipped", flush=True)
        elif finished_elsewhere(folder, command):
            print(f"[{i}/{len(points)}] {point.name}: finished outside the sweep, gathered", flush=True)
            write_json({"seconds": math.nan, "peak_rss_gb": math.nan}, done)
        else:
            print(f"[{i}/{len(points)}] {point.name}: {commands[i - 1]}", flush=True)
            stage = run_stage(point_args(command, configs, point, folder, fixed), caller=f"dpo-lit sweep, point {point.name}")
            write_json({"seconds": stage.seconds, "peak_rss_gb": stage.peak_rss_gb}, done)
        record = json.loads(done.read_text())
        metrics = onpolicy_metrics(folder) if command == "onpolicy" else fit_metrics(folder)
        rows.append({**point.values, "seed": point.seed, **metrics, "seconds": record["seconds"],
                     "peak_rss_gb": record["peak_rss_gb"]})  # fmt: skip
    write_summary_csv(rows, out / "summary.csv")
    write_summary_png(rows, next(iter(grid)), out / "summary.png")
    print(f"summary: {out / 'summary.csv'}, {out / 'summary.png'}; commands: {out / 'commands.txt'}", flush=True)
    return rows


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``dpo-lit sweep`` with the command line's ``argv`` (after ``sweep``)."""
    parser = command_parser("sweep", __doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config file(s), stacked as by fit")
    parser.add_argument("--grid", action="append", required=True, help="KEY=v1,v2,... (repeat for more keys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override every point shares, not part of the folder names (repeat for more)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--out_dir", required=True, help="one folder per point, commands.txt, summary.csv/png")
    parser.add_argument("--command", type=Literal["fit", "onpolicy"], default="fit", help="what each point runs")
    args = parse_command(parser, argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    return run_sweep(args.config, parse_grid(args.grid), seeds, args.out_dir, args.command, parse_fixed(args.set))
