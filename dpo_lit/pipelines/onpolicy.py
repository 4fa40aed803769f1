"""On-policy DPO end to end: generate pairs → fit → measure, for one or more rounds.

    dpo-lit onpolicy --config configs/quickstart/pipeline.yaml               # make quickstart
    dpo-lit onpolicy --config configs/quickstart/pipeline.yaml --rounds 3    # iterative DPO

Each round builds and runs two Lightning jobs from their own configs: ``predict`` (the current
model samples k answers per training prompt, a reward object scores them, best vs worst become
pairs) and ``fit`` (DPO with LoRA on those pairs; the merged model becomes the next round's
sampler). After each round the policy and the original reference answer the held-out prompts with
the same seeds (a paired comparison): the mean reward of each, their per-prompt difference with
its standard error, and KL(π‖π_ref) estimated on the policy's own samples (temperature 1, no
top-p: an unbiased sequence-level estimate). Everything lands in ``out_dir``: pairs, TensorBoard
logs, ``report.json``, ``report.png``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.data.io import DataSource, atomic_write, write_json
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.evaluation.evaluate import TaskData, evaluate_task, load_task_data
from dpo_lit.models import cache_dir, load_model, load_tokenizer, model_hash
from dpo_lit.pipelines.plots import plot_run
from dpo_lit.pipelines.report import RoundReport, format_report, write_report_json, write_report_png
from dpo_lit.rewards import Reward, VaderSentiment
from dpo_lit.sampling.measure import MeasureSpec, measure, paired_gain
from dpo_lit.sampling.sample import Sample, sample


def compare_on_prompts(
    reference, policy, tokenizer, prompts: list, reward: Reward, num_samples: int, max_new_tokens: int, seed: int,
    reference_samples: list[Sample] | None = None,
) -> dict:
    """Paired comparison of two models on the same prompts and sampling seeds, plus sampled KL: two
    :func:`~dpo_lit.sampling.measure.measure` calls and their :func:`~dpo_lit.sampling.measure.paired_gain`.

    ``reference_samples`` (the reference's samples of an earlier call with the same prompts and
    seed) saves sampling the reference again when several policies are compared with it.
    """
    ids = encode_prompts(tokenizer, prompts)
    spec = MeasureSpec(num_samples, max_new_tokens, seed=seed)
    with tqdm(total=2, desc="evaluate", unit="model", leave=True) as bar:
        ref = measure(reference, tokenizer, prompts, ids, spec, reward, samples=reference_samples)
        bar.update()
        pol = measure(policy, tokenizer, prompts, ids, spec, reward, reference=reference)
        bar.update()
    examples = [
        {"prompt": ref.samples[i * num_samples].prompt, "reference": ref.samples[i * num_samples].completion,
         "policy": pol.samples[i * num_samples].completion}
        for i in range(min(2, len(prompts)))
    ]  # fmt: skip
    return {
        "reference": (ref.reward, ref.reward_se), "policy": (pol.reward, pol.reward_se),
        "gain": paired_gain(pol, ref), "kl": (pol.kl.mean, pol.kl.stderr), "examples": examples,
        "reference_samples": ref.raw,
    }  # fmt: skip


def _cached(kind: str, *parts: object) -> Path:
    """The cache entry of an output of the starting model, named by a hash of everything it depends on."""
    key = hashlib.sha256("\x00".join(str(part) for part in parts).encode()).hexdigest()[:24]
    return cache_dir() / "onpolicy" / kind / key


def _file_bytes(path: str | None) -> bytes:
    return Path(path).read_bytes() if path and Path(path).is_file() else b""


def reference_samples(
    reference, weights: str, tokenizer, prompts: list, num_samples: int, max_new_tokens: int, seed: int
) -> list[Sample]:
    """The reference's evaluation samples, cached under its weights, the prompt ids and the sampling
    settings: every policy of a sweep is compared with the very same reference answers."""
    ids = encode_prompts(tokenizer, prompts)
    path = _cached("reference_samples", weights, ids, num_samples, max_new_tokens, seed).with_suffix(".json")
    if path.is_file():
        return [Sample(**row) for row in json.loads(path.read_text())]
    samples = sample(reference, tokenizer, ids, num_samples, max_new_tokens, seed=seed)
    write_json([asdict(s) for s in samples], path)
    return samples


def capability_scores(
    model, tokenizer, tasks: Sequence[TaskData], perplexity_tokens: int | None
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` (see :mod:`dpo_lit.evaluation`)."""
    return {task.name: evaluate_task(model, tokenizer, task, perplexity_tokens=perplexity_tokens) for task in tasks}


def capability_deltas(
    reference, weights: str, policy, tokenizer, tasks: Sequence[TaskData], limit: int | None,
    perplexity_tokens: int | None,
) -> dict[str, dict[str, float]]:
    """``{"task/metric": {"reference", "policy", "delta"}}`` on ``tasks`` (loaded with ``limit``
    items); the reference's scores are cached."""
    if not tasks:
        return {}
    path = _cached("capabilities", weights, [task.name for task in tasks], limit, perplexity_tokens)
    path = path.with_suffix(".json")
    if path.is_file():
        ref = json.loads(path.read_text())
    else:
        ref = capability_scores(reference, tokenizer, tasks, perplexity_tokens)
        write_json(ref, path)
    pol = capability_scores(policy, tokenizer, tasks, perplexity_tokens)
    return {
        f"{task}/{metric}": {"reference": ref[task][metric], "policy": value, "delta": value - ref[task][metric]}
        for task, metrics in pol.items()
        for metric, value in metrics.items()
    }


def generate_pairs(
    config: str, model: str, pairs: Path, seed: int, prompts_file: str | None, weights: str | None = None
) -> bool:
    """``dpo-lit predict`` with ``config``: sample from ``model``, write scored pairs to ``pairs``.

    With ``weights`` (the hash of ``model``'s weights and config) the pairs are cached under a key of the
    weights, the resolved config and the prompt files' bytes, and a later call with the same key
    copies them instead of sampling again (what a sweep's points share). Returns whether it did.
    """
    from dpo_lit.jobs import build_cli

    overrides = {"model.model_name": model, "output.path": str(pairs), "model.seed": seed}
    if prompts_file:
        overrides["data.prompts_file"] = prompts_file
    cli = build_cli("predict", [config], overrides)
    cached = None
    if weights is not None:
        resolved = cli.config.clone()
        resolved.output.path = None
        resolved.model.model_name = None  # the weights stand for it
        data = cli.config.data
        cached = _cached(
            "pairs", weights, cli.parser.dump(resolved, skip_check=True),
            _file_bytes(data.prompts_file).hex(), _file_bytes(data.get("val_prompts_file")).hex(),
        ).with_suffix(".jsonl")  # fmt: skip
        if cached.is_file():
            pairs.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, pairs)
            return True
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    if cached is not None:
        with atomic_write(cached) as tmp:
            shutil.copyfile(pairs, tmp)
    return False


def train(config: str, model: str, pairs: Path, root: Path, seed: int, beta: float | None = None) -> Path:
    """``dpo-lit fit`` with ``config`` on ``pairs``, starting from ``model`` (with the loss's
    ``beta`` replaced unless None); returns the run folder."""
    from dpo_lit.jobs import build_cli

    overrides = {
        "model.model_name": model, "data.train_files": [str(pairs)], "trainer.default_root_dir": str(root),
        "seed_everything": seed, "trainer.enable_model_summary": False,
    }  # fmt: skip
    if beta is not None:
        overrides["model.loss.init_args.beta"] = beta
    cli = build_cli("fit", [config], overrides)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return ExportPretrained.run_dir(cli.trainer)


def run_pipeline(
    generate_config: DataSource = "configs/generate/everyday_vader.yaml",
    train_config: DataSource = "configs/quickstart/dpo.yaml",
    reward: Reward | None = None,
    train_prompts: DataSource | None = None,
    heldout_prompts: DataSource = "dpo_lit/assets/everyday_prompts_heldout.txt",
    model_name: str = "smollm2-135m-instruct",
    rounds: int = 1,
    out_dir: str = "runs/quickstart",
    eval_samples: int = 4,
    eval_max_new_tokens: int = 48,
    eval_seed: int = 1234,
    seed: int = 0,
    beta: float | None = None,
    capability_tasks: Sequence[str] = (),
    capability_limit: int | None = 200,
    perplexity_tokens: int | None = 4096,
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
        beta: the DPO loss's beta (None: the train config's).
        capability_tasks: evaluation tasks (``wikitext``, ``arc_easy``, ..., see
            :mod:`dpo_lit.evaluation`) scored on the policy and the reference after every round.
        capability_limit: items per multiple-choice task (a subset seeded with 0; None: all).
        perplexity_tokens: tokens of a perplexity task's text scored (None: all).

    What depends only on the starting model is cached (``$DPO_LIT_CACHE/onpolicy``) and shared by
    every run with the same settings, e.g. the points of a beta sweep: round 1's pairs, the
    reference's evaluation samples and its capability scores.
    """
    reward = reward or VaderSentiment()
    out = Path(out_dir)
    prompts = read_prompts(heldout_prompts)  # bad prompt files fail here, before any model loads
    source = f"{len(read_prompts(train_prompts))} prompts of {train_prompts}" if train_prompts else generate_config
    tokenizer = load_tokenizer(model_name)
    reference = load_model(model_name)
    weights = model_hash(reference)  # weights and config: both change what it samples
    # loaded once, here: a missing task file fails before an hour of work
    tasks = [load_task_data(task, limit=capability_limit, seed=0) for task in capability_tasks]
    reports, current = [], model_name
    for r in range(1, rounds + 1):
        head = f"[round {r}/{rounds}]"
        t0 = time.time()
        pairs = out / f"round{r}" / "pairs.jsonl"
        print(f"{head} generate: answers to the training prompts ({source}) → {pairs}", flush=True)
        if generate_pairs(generate_config, current, pairs, seed + r, train_prompts, weights if r == 1 else None):
            print("  copied from the cache: an earlier run made these pairs (same weights, config, prompts, seed)",
                  flush=True)  # fmt: skip
        t1 = time.time()
        print(f"{head} train: DPO on {sum(1 for _ in pairs.open())} pairs ({train_config})", flush=True)
        run_dir = train(train_config, current, pairs, out / f"round{r}", seed + r, beta)
        plot_run(run_dir)  # training curves: <run_dir>/plots/*.png
        current = str(run_dir / "merged")
        t2 = time.time()
        print(f"{head} evaluate: {len(prompts)} held-out prompts × {eval_samples} samples, reference and policy",
              flush=True)
        policy = load_model(current)
        ref_samples = reference_samples(reference, weights, tokenizer, prompts, eval_samples, eval_max_new_tokens,
                                        eval_seed)  # fmt: skip
        result = compare_on_prompts(
            reference, policy, tokenizer, prompts, reward, eval_samples, eval_max_new_tokens, eval_seed, ref_samples
        )
        capabilities = capability_deltas(
            reference, weights, policy, tokenizer, tasks, capability_limit, perplexity_tokens
        )
        t3 = time.time()
        reports.append(RoundReport(
            round=r, model=current, pairs=sum(1 for _ in pairs.open()),
            reference_reward=result["reference"][0], reference_reward_se=result["reference"][1],
            policy_reward=result["policy"][0], policy_reward_se=result["policy"][1],
            paired_gain=result["gain"][0], paired_gain_se=result["gain"][1],
            kl=result["kl"][0], kl_se=result["kl"][1], examples=result["examples"], capabilities=capabilities,
            seconds={"generate": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2},
        ))  # fmt: skip
        write_report_json(reports, out / "report.json")
        print(format_report(reports, run_dir), flush=True)
    write_report_png(reports, out / "report.png")
    return reports
