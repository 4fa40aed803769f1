"""Plot a run's logged scalars (TensorBoard event files, or a CSVLogger's ``metrics.csv``) as PNG files.

    dpo-lit plots runs/tiny-monitored/lightning_logs/version_0 [--out DIR]

writes, for the groups that have data, ``loss.png`` (train and val loss), ``margins.png`` (reward
margins, with val chosen/rejected rewards), ``accuracy.png`` (reward accuracies), ``kl.png``
(sampled KL(π‖π_ref) with ±1 standard-error bands), ``capability.png`` (``cap/*_delta``: policy
minus reference, one panel per metric) and ``overview.png`` (all groups on one page), and prints
the paths. Noisy per-step training curves are drawn faint with a moving average on top.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dpo_lit.errors import MissingFileError
from dpo_lit.jobs import command_parser, parse_command

Series = list[tuple[int, float]]
Scalars = dict[str, Series]

TRAIN, VAL, REF = "tab:blue", "tab:orange", "0.45"
SMOOTH_ABOVE = 50  # curves with more points are drawn faint, with a moving average on top


def _log_files(run_dir: Path, recursive: bool = True) -> list[Path]:
    """TensorBoard event files and CSVLogger ``metrics.csv`` files in (or below) ``run_dir``."""
    find = run_dir.rglob if recursive else run_dir.glob
    return [*find("events.out.tfevents.*"), *find("metrics.csv")]


def find_event_dir(run_dir: str | Path) -> Path:
    """The folder of a run's logged scalars under ``run_dir`` (itself or below; with several
    runs below it, the newest that trained: a ``validate`` after ``fit`` adds a version folder
    with only its ``val/`` points; the newest of all when none trained)."""
    run_dir = Path(run_dir)
    files = sorted(_log_files(run_dir), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MissingFileError(f"no TensorBoard event files or metrics.csv under {run_dir}")
    folders = list(dict.fromkeys(f.parent for f in reversed(files)))  # newest first
    if len(folders) > 1:
        for folder in folders:
            if any(tag.startswith("train/") for tag in read_scalars(folder)):
                return folder
    return folders[0]


def read_scalars(run_dir: str | Path) -> Scalars:
    """Every scalar tag of the run as ``{tag: [(step, value), ...]}`` sorted by step (the last value
    wins when a tag was written twice at one step)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run_dir = Path(run_dir)
    event_dir = run_dir if _log_files(run_dir, recursive=False) else find_event_dir(run_dir)
    if not any(event_dir.glob("events.out.tfevents.*")):
        return _read_csv(event_dir / "metrics.csv")
    accumulator = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    scalars: Scalars = {}
    for tag in accumulator.Tags()[SCALARS]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())
    return scalars


def _read_csv(path: Path) -> Scalars:
    """A CSVLogger's ``metrics.csv`` (a ``step`` column, one column per metric, empty where a row
    does not log it) as :func:`read_scalars` returns TensorBoard's."""
    by_tag: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for tag, value in row.items():
                if tag not in ("step", "epoch") and value not in ("", None):
                    by_tag.setdefault(tag, {})[step] = float(value)
    return {tag: sorted(points.items()) for tag, points in by_tag.items()}


# ---- drawing ---------------------------------------------------------------------------------


def _moving_average(values: Sequence[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _line(ax: Axes, series: Series, label: str, color: str | None, marker: str | None = None) -> None:
    """A curve; a long noisy one faint, with its moving average on top."""
    steps, values = zip(*series)
    if len(series) > SMOOTH_ABOVE:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        width = max(2, len(series) // 20)
        ax.plot(steps, _moving_average(values, width), color=color, label=f"{label} (avg of {width})")
    else:
        ax.plot(steps, values, color=color, label=label, marker=marker, markersize=4)


def _band(ax: Axes, scalars: Scalars, tag: str, label: str, color: str) -> None:
    """``tag`` with a ±1 standard-error band from ``tag + '_stderr'`` (SampledKL's: over prompts)."""
    _line(ax, scalars[tag], label, color, marker="o")
    errors = dict(scalars.get(f"{tag}_stderr", []))
    points = [(s, v, errors[s]) for s, v in scalars[tag] if s in errors and math.isfinite(errors[s])]
    if points:
        steps, values, err = zip(*points)
        low = [v - e for v, e in zip(values, err)]
        high = [v + e for v, e in zip(values, err)]
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0, label=f"{label} ± 1 s.e. over prompts")


def _finish(ax: Axes, title: str, ylabel: str, legend: str | None = "best") -> None:
    """Title, labels, grid and a legend (``legend``: its location, "outside" to the right, None: none)."""
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend == "outside":
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif legend is not None:
        ax.legend(fontsize="small", loc=legend)


def draw_loss(ax: Axes, s: Scalars) -> None:
    for split, color in (("train", TRAIN), ("val", VAL)):
        if f"{split}/loss" in s:
            _line(ax, s[f"{split}/loss"], split, color, marker="o" if split == "val" else None)
    first = s.get("train/loss", s.get("val/loss"))[0][1]
    if abs(first - math.log(2)) < 1e-2:  # a DPO-family loss that starts at the reference
        ax.axhline(math.log(2), color=REF, linestyle="--", linewidth=1, label="ln 2 (policy = reference)")
    _finish(ax, "Loss", "loss")


def draw_margins(ax: Axes, s: Scalars) -> None:
    for tag, label, color in (
        ("train/rewards/margins", "train margin", TRAIN),
        ("val/rewards/margins", "val margin", VAL),
        ("val/rewards/chosen", "val chosen reward", "tab:green"),
        ("val/rewards/rejected", "val rejected reward", "tab:red"),
    ):
        if tag in s:
            _line(ax, s[tag], label, color, marker=None if tag.startswith("train") else "o")
    ax.axhline(0, color=REF, linewidth=1)
    _finish(ax, "Implicit rewards", "reward (β · log-ratio)")


def draw_accuracy(ax: Axes, s: Scalars) -> None:
    for split, color in (("train", TRAIN), ("val", VAL)):
        if f"{split}/rewards/accuracies" in s:
            _line(ax, s[f"{split}/rewards/accuracies"], split, color, marker="o" if split == "val" else None)
    ax.axhline(0.5, color=REF, linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(-0.03, 1.03)
    _finish(ax, "Reward accuracy (chosen > rejected)", "accuracy")


def draw_kl(ax: Axes, s: Scalars) -> None:
    if "train/kl" in s:  # the same prompts and seed as val/kl: no second band over the first
        _line(ax, s["train/kl"], "train/kl (every n steps)", TRAIN)
    if "val/kl" in s:
        _band(ax, s, "val/kl", "val/kl", VAL)
    ax.axhline(0, color=REF, linewidth=1)
    _finish(ax, "Sampled KL(π ‖ π_ref)", "nats per completion")


def _capability_tags(s: Scalars) -> list[str]:
    return sorted(tag for tag in s if tag.startswith("cap/") and tag.endswith("_delta"))


def _metric_name(tag: str) -> str:
    return tag.removeprefix("cap/").removesuffix("_delta")  # "wikitext/ppl"


def draw_capability_relative(ax: Axes, s: Scalars) -> None:
    """Every capability delta on one axis, relative to the reference's score when it was logged."""
    relative = True
    for tag in _capability_tags(s):
        reference = s.get(tag.replace("_delta", "_ref"))
        if reference and reference[0][1] != 0:
            series = [(step, 100 * value / abs(reference[0][1])) for step, value in s[tag]]
        else:
            series, relative = s[tag], False
        _line(ax, series, _metric_name(tag), None, marker="o")
    ax.axhline(0, color=REF, linewidth=1)
    ylabel = "% of the reference's score" if relative else "difference"
    title = "Capability: policy − reference (accuracy: higher is better; perplexity: lower)"
    _finish(ax, title, ylabel, legend="outside")


def draw_capability(fig: Figure, s: Scalars) -> None:
    """One panel per ``cap/*_delta`` metric: they have different units."""
    tags = _capability_tags(s)
    columns = min(3, len(tags))
    rows = math.ceil(len(tags) / columns)
    fig.set_size_inches(4.2 * columns, 3.2 * rows)
    for i, tag in enumerate(tags):
        ax = fig.add_subplot(rows, columns, i + 1)
        _line(ax, s[tag], "policy − reference", "tab:purple", marker="o")
        ax.axhline(0, color=REF, linewidth=1)
        name = _metric_name(tag)
        reference = s.get(tag.replace("_delta", "_ref"))
        title = f"{name} (reference {reference[0][1]:.4g})" if reference else name
        _finish(ax, title, f"Δ {name.split('/')[-1]}", legend=None)
    fig.suptitle("Capability deltas (policy − reference; below 0 is worse for acc, better for ppl)")


GROUPS: dict[str, tuple[Callable[[Scalars], bool], Callable[[Axes, Scalars], None]]] = {
    "loss": (lambda s: "train/loss" in s or "val/loss" in s, draw_loss),
    "margins": (lambda s: any(t in s for t in ("train/rewards/margins", "val/rewards/margins")), draw_margins),
    "accuracy": (lambda s: any(t in s for t in ("train/rewards/accuracies", "val/rewards/accuracies")), draw_accuracy),
    "kl": (lambda s: "val/kl" in s or "train/kl" in s, draw_kl),
    "capability": (lambda s: bool(_capability_tags(s)), draw_capability_relative),
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of the groups that have data into ``out_dir`` (default: ``<event dir>/plots``);
    return their paths, ``overview.png`` last."""
    event_dir = find_event_dir(run_dir)
    scalars = read_scalars(event_dir)
    out = Path(out_dir) if out_dir is not None else event_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    present = [name for name, (has, _) in GROUPS.items() if has(scalars)]
    written = []
    for name in present:
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        if name == "capability":
            draw_capability(fig, scalars)
        else:
            GROUPS[name][1](fig.add_subplot(), scalars)
        written.append(_save(fig, out / f"{name}.png"))
    if present:
        columns = min(2, len(present))
        rows = math.ceil(len(present) / columns)
        fig = Figure(figsize=(7 * columns, 4.2 * rows), layout="constrained")
        for i, name in enumerate(present):
            last_alone = i == len(present) - 1 and len(present) % columns
            ax = fig.add_subplot(rows, columns, (i + 1, rows * columns) if last_alone else i + 1)
            GROUPS[name][1](ax, scalars)
        fig.suptitle(f"{event_dir}", fontsize="medium")
        written.append(_save(fig, out / "overview.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str]) -> None:
    """``dpo-lit plots`` with the command line's ``argv`` (after ``plots``)."""
    parser = command_parser("plots", __doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a TensorBoard log folder (lightning_logs/version_N) or a folder above one")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: <event dir>/plots)")
    args = parse_command(parser, argv)
    event_dir = find_event_dir(args.run_dir)  # chosen once: with several runs, it reads their scalars
    paths = plot_run(event_dir, args.out)
    print(f"run: {event_dir}")
    for path in paths:
        print(path)
