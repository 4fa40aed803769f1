"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1 and Figure 2): the
reward–KL frontier of DPO against PPO on IMDb, from one command.

    dpo-lit frontier --config configs/frontier/imdb_quick.yaml     # make imdb-frontier-quick
    dpo-lit frontier --config configs/frontier/imdb.yaml           # make imdb-frontier

The stages, each a normal ``dpo-lit`` job built from its own config (``configs/frontier/``):

1. **ground truth**: a sentiment classifier (:mod:`dpo_lit.rewards.classifier`) trained on IMDb
   train and measured on IMDb test: the reward is its P(positive) of prefix + completion;
2. **prompts**: review prefixes of 2–8 tokens, from IMDb train (training) and IMDb test (held out);
3. **SFT**: the policy learns to write reviews (IMDb train reviews as plain text, LoRA, merged);
4. **pairs**: the SFT model samples 4 completions per training prefix, the classifier scores
   them, and every ordered pair of distinct scores becomes a preference pair (6 per prefix);
5. **DPO** at each β, and **Preferred-FT** (SFT on the pairs' chosen completions), on those pairs;
6. **PPO-GT** (the classifier as reward) at each KL coefficient, **RLOO** and **GRPO** on the
   classifier's reward at theirs, and **PPO** with a reward model trained on the same pairs
   (Bradley–Terry, :class:`~dpo_lit.rlhf.RewardModule`) at each.

Every run starts from the SFT model, which is also the reference of every KL. Along each run
(every ``eval_every`` optimizer steps, and at its end) :class:`~dpo_lit.callbacks.HeldoutRewardKL`
samples completions of the same held-out prefixes with the same seed, and records the mean
classifier reward and the sampled sequence-level KL(π‖π_SFT), each ± its SE over prompts (each
prompt's samples averaged first). Everything lands in
``out_dir``:

- ``frontier.csv`` (``method, setting, step, reward, reward_se, kl, kl_se``) and ``frontier.png``
  (reward against KL, a line per run);
- ``samples/NAME.jsonl``: every scored held-out sample of every run, to read;
- ``judged.csv``: from those samples, each point's reward gain over the SFT model paired by prompt,
  and a second judge independent of the classifier (VADER), see
  :mod:`~dpo_lit.pipelines.frontier_report`;
- ``classifier.json`` and ``runs.json`` (each stage's seconds, the reward model's validation, the
  second judge's IMDb test accuracy).

Finished runs are kept in ``out_dir/points/`` and skipped by a later call, which resumes a cut-off
grid; a changed config needs a new ``out_dir`` (nothing checks that it matches).
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.callbacks.reward_kl import (
    HeldoutRewardKL,
    HeldoutSample,
    RewardKLPoint,
    sample_and_score,
    summarize_samples,
)
from dpo_lit.data.io import DataSource, read_records, write_json, write_jsonl
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.errors import ConfigError, DataError
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.pipelines.frontier_report import (
    JUDGED_COLUMNS,
    format_table,
    judge_samples,
    vader_accuracy,
    write_csv,
    write_frontier_png,
)
from dpo_lit.rewards.classifier import SentimentClassifier, clean_review, train_sentiment_classifier


def make_prefixes(
    path: str, tokenizer, count: int, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[dict[str, str]]:
    """``count`` review prefixes of ``min_tokens``–``max_tokens`` tokens (uniformly), from reviews
    drawn at random (``seed``) from an IMDb file: ``{"prompt": text, "source": "file:line"}``."""
    if not 1 <= min_tokens <= max_tokens:
        raise ConfigError(f"prefix_tokens: expected 1 <= min <= max, got {min_tokens}, {max_tokens}")
    records = [(clean_review(r["text"]), where) for r, where in read_records(path) if isinstance(r.get("text"), str)]
    if len(records) < count:
        raise DataError(path, f"{len(records)} reviews, fewer than the {count} prefixes asked for")
    rng = random.Random(seed)
    prefixes = []
    for index in rng.sample(range(len(records)), len(records)):
        text, where = records[index]
        ids = tokenizer.encode(" ".join(text.split()), add_special_tokens=False)
        k = rng.randint(min_tokens, max_tokens)
        prefix = tokenizer.decode(ids[:k]).rstrip()
        if len(ids) > k and prefix.strip():
            prefixes.append({"prompt": prefix, "source": where})
        if len(prefixes) == count:
            break
    return prefixes


def classifier_reward(path: Path) -> dict[str, Any]:
    """The classifier as a ``class_path`` reward for a config override."""
    return {"class_path": f"{SentimentClassifier.__module__}.{SentimentClassifier.__name__}",
            "init_args": {"path": str(path)}}  # fmt: skip


class Frontier:
    """The stages of :func:`run_frontier`, sharing the output folder and the held-out evaluation."""

    def __init__(self, out: Path, seed: int, evaluation: dict[str, Any]) -> None:
        self.out, self.seed, self.evaluation = out, seed, evaluation
        self.rows: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = {}
        self.heldout: Path | None = None  # the held-out prefixes, once written
        self.reward: dict[str, Any] | None = None  # the classifier as a class_path reward, once trained

    def done(self, name: str) -> dict | None:
        path = self.out / "points" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def keep(self, name: str, method: str, setting: str, points: Sequence[RewardKLPoint],
             samples: Sequence[HeldoutSample], seconds: float) -> None:  # fmt: skip
        """Save a finished run: its samples in ``samples/NAME.jsonl``, then its points (the mark
        that it is finished) in ``points/NAME.json``."""
        write_jsonl(({"method": method, "setting": setting, **asdict(s)} for s in samples),
                    self.out / "samples" / f"{name}.jsonl")  # fmt: skip
        record = {"method": method, "setting": setting, "seconds": seconds, "points": [asdict(p) for p in points]}
        write_json(record, self.out / "points" / f"{name}.json")
        self.add(record)

    def add(self, record: dict) -> None:
        for point in record["points"]:
            self.rows.append({"method": record["method"], "setting": record["setting"], **point})
        self.seconds[f"{record['method']} {record['setting']}".strip()] = record["seconds"]
        write_csv(self.rows, self.out / "frontier.csv")

    def fit(self, name: str, config: str, overrides: dict[str, Any], callback: HeldoutRewardKL | None = None,
            validate: bool = False):  # fmt: skip
        """``dpo-lit fit --config CONFIG`` with ``overrides`` into ``out/NAME``, the held-out
        evaluation added to its callbacks (and a validation of the trained model when asked: a run
        cut by ``max_steps`` mid-epoch has none); returns the trainer and the run folder."""
        from dpo_lit.jobs import build_cli

        overrides = {
            "seed_everything": self.seed, "trainer.default_root_dir": str(self.out / name),
            "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False, **overrides,
        }  # fmt: skip
        cli = build_cli("fit", [config], overrides)
        if callback is not None:
            cli.trainer.callbacks.append(callback)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        run_dir = ExportPretrained.run_dir(cli.trainer)
        if validate:
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        return cli.trainer, run_dir

    def evaluation_callback(self, every: int) -> HeldoutRewardKL:
        e = self.evaluation
        return HeldoutRewardKL(
            str(self.heldout), SentimentClassifier(self.reward["init_args"]["path"]), num_prompts=None,
            num_samples=e["samples"], max_new_tokens=e["max_new_tokens"], chat=False, batch_size=e["batch_size"],
            seed=e["seed"], every_n_steps=every,
        )  # fmt: skip

    def measured_run(self, name: str, method: str, setting: str, config: str, overrides: dict, every: int) -> None:
        """A point of the frontier: fit ``config`` with ``overrides``, measured on the held-out
        prefixes every ``every`` steps and at its end (skipped when a finished one is on disk)."""
        label = f"{method} {setting}".strip()
        record = self.done(name)
        if record is not None:
            self.add(record)
            print(f"[{label}] done before: {len(record['points'])} points", flush=True)
            return
        print(f"[{label}] {config}", flush=True)
        t = time.time()
        callback = self.evaluation_callback(every)
        self.fit(name, config, {"export.enabled": False, **overrides}, callback)
        self.keep(name, method, setting, callback.points, callback.samples, time.time() - t)
        last = callback.points[-1]
        print(f"[{label}] step {last.step}: reward {last.reward:.3f} ± {last.reward_se:.3f}, "
              f"KL {last.kl:.2f} ± {last.kl_se:.2f} nats ({time.time() - t:.0f} s)", flush=True)  # fmt: skip

    def trained_model(self, name: str, config: str, overrides: dict[str, Any], validate: bool = False) -> dict:
        """A stage whose product is a model (the SFT model, the reward model): its exported folder,
        seconds and validation metrics, from disk when a finished one is there."""
        record = self.done(name)
        if record is None:
            t = time.time()
            trainer, run_dir = self.fit(name, config, {"export.merge": True, **overrides}, validate=validate)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            record = {"model": str(ExportPretrained.exported(run_dir)), "seconds": time.time() - t, "val": metrics}
            write_json(record, self.out / "points" / f"{name}.json")
        return record

    def start_point(self, model: str) -> None:
        """The starting point, the SFT model itself (KL 0 by definition; measured like every other point)."""
        record = self.done("sft-point")
        if record is not None:
            self.add(record)
            return
        t = time.time()
        policy, tokenizer, e = load_model(model), load_tokenizer(model), self.evaluation
        prompts = read_prompts(self.heldout)
        samples = sample_and_score(
            policy, policy, contextlib.nullcontext, tokenizer, prompts, encode_prompts(tokenizer, prompts, chat=False),
            SentimentClassifier(self.reward["init_args"]["path"]), e["samples"], e["max_new_tokens"],
            e["batch_size"], e["seed"],
        )  # fmt: skip
        self.keep("sft-point", "sft", "", [summarize_samples(samples)], samples, time.time() - t)


def ground_truth(out: Path, train_file: str, test_file: str, max_examples: int | None) -> dict[str, Any]:
    """The sentiment classifier (``out/classifier.pkl``) and its measurement (``classifier.json``),
    trained unless a finished one is there."""
    info_path = out / "classifier.json"
    if info_path.is_file() and (out / "classifier.pkl").is_file():
        info = json.loads(info_path.read_text())
    else:
        print(f"[classifier] TF-IDF + logistic regression on {train_file}, measured on {test_file}", flush=True)
        info = train_sentiment_classifier(train_file, test_file, out, max_examples)
    print(f"[classifier] test accuracy {info['test_accuracy']:.4f} on {info['test_examples']} reviews", flush=True)
    return info


def write_pairs(config: str, model: str, reward: dict[str, Any], samples: int, max_new_tokens: int, seed: int,
                prompts: Path, pairs: Path) -> None:  # fmt: skip
    """``dpo-lit predict --config CONFIG``: ``samples`` completions of each prompt by ``model``,
    scored by ``reward``, every ordered pair of distinct scores written to ``pairs``."""
    from dpo_lit.jobs import build_cli

    cli = build_cli("predict", [config], {
        "model.model_name": model, "model.reward": reward, "model.num_samples": samples,
        "model.max_new_tokens": max_new_tokens, "model.seed": seed, "data.prompts_file": str(prompts),
        "data.chat": False, "output.path": str(pairs),
    })  # fmt: skip
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)


def run_frontier(
    model_name: str = "smollm2-135m-instruct",
    out_dir: str = "runs/imdb_frontier",
    train_file: DataSource = "hub:stanfordnlp/imdb?split=train",
    test_file: DataSource = "hub:stanfordnlp/imdb?split=test",
    classifier_max_examples: int | None = None,
    sft_config: DataSource = "configs/frontier/stages/sft.yaml",
    generate_config: DataSource = "configs/frontier/stages/generate.yaml",
    dpo_config: DataSource = "configs/frontier/stages/dpo.yaml",
    reward_config: DataSource = "configs/frontier/stages/reward.yaml",
    ppo_config: DataSource = "configs/frontier/stages/ppo.yaml",
    rloo_config: DataSource = "configs/frontier/stages/rloo.yaml",
    grpo_config: DataSource = "configs/frontier/stages/grpo.yaml",
    train_prefixes: int = 128,
    heldout_prefixes: int = 64,
    prefix_tokens: tuple[int, int] = (2, 8),
    samples_per_prefix: int = 4,
    max_new_tokens: int = 32,
    betas: Sequence[float] = (0.05, 0.1, 1.0, 5.0),
    dpo_steps: int = 48,
    dpo_eval_every: int = 12,
    preferred_ft: bool = True,
    preferred_ft_eval_every: int | None = None,
    ppo_gt_kl_coefs: Sequence[float] = (0.02, 0.05, 0.2),
    ppo_rm_kl_coefs: Sequence[float] = (0.05, 0.2),
    rloo_kl_coefs: Sequence[float] = (0.05,),
    grpo_kl_coefs: Sequence[float] = (0.04,),
    ppo_steps: int = 48,
    ppo_eval_every: int = 12,
    eval_samples: int = 4,
    eval_seed: int = 1234,
    eval_batch_size: int = 64,
    sft_overrides: dict[str, Any] | None = None,
    dpo_overrides: dict[str, Any] | None = None,
    reward_overrides: dict[str, Any] | None = None,
    ppo_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train the classifier, SFT, the pairs, DPO, Preferred-FT, a reward model, PPO-GT and PPO;
    measure every run along training on held-out prefixes. Returns the rows of ``frontier.csv``.

    Args:
        model_name: the policy before SFT (Hub name, folder, ``.gguf`` or alias).
        out_dir: where everything goes; finished runs found there are not run again.
        train_file: IMDb reviews for the classifier, the SFT and the training prefixes.
        test_file: IMDb reviews for the classifier's accuracy and the held-out prefixes.
        classifier_max_examples: train the classifier on the first N reviews only (None: all).
        sft_config: ``fit`` config of the SFT stage (an SFTModule on ``train_file`` as text).
        generate_config: ``predict`` config of the pairs (its reward becomes the classifier).
        dpo_config: ``fit`` config of DPO (its ``beta`` is set per run; Preferred-FT swaps its loss
            for SFTLoss).
        reward_config: ``fit`` config of the reward model (a RewardModule on the pairs).
        ppo_config: ``fit`` config of PPO (its reward and ``kl_coef`` are set per run).
        rloo_config: ``fit`` config of RLOO (the classifier its reward, ``kl_coef`` set per run).
        grpo_config: ``fit`` config of GRPO (the classifier its reward, ``kl_coef`` set per run).
        train_prefixes: prefixes the pairs and PPO's rollouts are drawn for.
        heldout_prefixes: prefixes of the evaluation.
        prefix_tokens: the shortest and longest prefix, in tokens (drawn uniformly).
        samples_per_prefix: completions per training prefix for the pairs.
        max_new_tokens: the length of every completion: pairs, PPO's rollouts, the evaluation.
        betas: DPO's β of each DPO run.
        dpo_steps: optimizer steps of each DPO and Preferred-FT run.
        dpo_eval_every: steps between their held-out evaluations.
        preferred_ft: also run Preferred-FT.
        preferred_ft_eval_every: its steps between held-out evaluations (None: ``dpo_eval_every``;
            0: only at its end).
        ppo_gt_kl_coefs: the KL coefficient of each PPO run on the classifier's reward (the
            paper set a target KL for an adaptive coefficient; in runs this short the controller
            cannot move it far, so the coefficient itself is the setting).
        ppo_rm_kl_coefs: the same for PPO on the learned reward model.
        rloo_kl_coefs: the KL coefficient of each RLOO run on the classifier's reward (in the reward).
        grpo_kl_coefs: β of each GRPO run on the classifier's reward (the k3 KL loss term).
        ppo_steps: optimizer steps (updates) of each PPO, RLOO and GRPO run.
        ppo_eval_every: updates between their held-out evaluations.
        eval_samples: completions per held-out prefix at each evaluation.
        eval_seed: the evaluation's sampling seed (the same for every run and step).
        eval_batch_size: rows per ``generate`` call of the evaluation.
        sft_overrides: dotted-key overrides of the SFT config (e.g. ``trainer.max_steps``).
        dpo_overrides: the same for DPO and Preferred-FT.
        reward_overrides: the same for the reward model.
        ppo_overrides: the same for PPO, RLOO and GRPO.
        seed: the seed of prefixes, sampling and training.
    """
    if not 1 <= prefix_tokens[0] <= prefix_tokens[1]:  # before a minute of classifier training
        raise ConfigError(f"prefix_tokens: expected 1 <= min <= max, got {prefix_tokens[0]}, {prefix_tokens[1]}")
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = {"samples": eval_samples, "max_new_tokens": max_new_tokens, "seed": eval_seed,
                  "batch_size": eval_batch_size}  # fmt: skip
    frontier = Frontier(out, seed, evaluation)
    stages: dict[str, float] = {}

    # 1. the ground-truth reward
    t = time.time()
    info = ground_truth(out, train_file, test_file, classifier_max_examples)
    frontier.reward = classifier_reward(out / "classifier.pkl")
    stages["classifier"] = time.time() - t

    # 2. prefixes
    tokenizer = load_tokenizer(model_name)
    prefixes = {}
    for offset, (split, source, count) in enumerate((("train", train_file, train_prefixes),
                                                      ("heldout", test_file, heldout_prefixes))):  # fmt: skip
        prefixes[split] = out / f"prefixes_{split}.jsonl"
        if not prefixes[split].is_file():
            write_jsonl(make_prefixes(source, tokenizer, count, *prefix_tokens, seed=seed + offset), prefixes[split])
    frontier.heldout = prefixes["heldout"]
    print(f"[prompts] {train_prefixes} training and {heldout_prefixes} held-out prefixes of {prefix_tokens[0]}-"
          f"{prefix_tokens[1]} tokens: {prefixes['train']}, {prefixes['heldout']}", flush=True)  # fmt: skip

    # 3. SFT, and the starting point of every run
    print(f"[sft] {sft_config}", flush=True)
    sft = frontier.trained_model("sft", sft_config, {
        "model.model_name": model_name, "data.train_files": [train_file], **(sft_overrides or {}),
    })  # fmt: skip
    sft_model = sft["model"]
    stages["sft training"] = sft["seconds"]
    frontier.start_point(sft_model)

    # 4. pairs
    t = time.time()
    pairs = out / "pairs.jsonl"
    if not pairs.is_file():
        print(f"[pairs] {samples_per_prefix} samples of each training prefix, scored by the classifier", flush=True)
        write_pairs(generate_config, sft_model, frontier.reward, samples_per_prefix, max_new_tokens, seed,
                    prefixes["train"], pairs)  # fmt: skip
        stages["pairs"] = time.time() - t
    count = sum(1 for _ in pairs.open())
    if count == 0:
        raise DataError(str(pairs), "no pairs: every sample of every prefix had the same reward")
    print(f"[pairs] {count} pairs: {pairs}", flush=True)
    trained_on = {"model.model_name": sft_model, "data.train_files": [str(pairs)]}

    # 5. DPO at each beta, Preferred-FT
    dpo = {**trained_on, "trainer.max_steps": dpo_steps, **(dpo_overrides or {})}
    for beta in betas:
        frontier.measured_run(f"dpo-beta={beta:g}", "dpo", f"beta={beta:g}", dpo_config,
                              {**dpo, "model.loss.init_args.beta": beta}, dpo_eval_every)  # fmt: skip
    if preferred_ft:
        frontier.measured_run("preferred-ft", "preferred-ft", "", dpo_config,
                              {**dpo, "model.loss": {"class_path": "dpo_lit.losses.SFTLoss"}},
                              dpo_eval_every if preferred_ft_eval_every is None else preferred_ft_eval_every)  # fmt: skip

    # 6. PPO on the classifier; the reward model on the pairs, then PPO on it
    ppo = {"model.model_name": sft_model, "data.prompts_file": str(prefixes["train"]),
           "model.max_new_tokens": max_new_tokens, "trainer.max_steps": ppo_steps,
           **(ppo_overrides or {})}  # fmt: skip
    for coef in ppo_gt_kl_coefs:
        frontier.measured_run(f"ppo-gt-kl_coef={coef:g}", "ppo-gt", f"kl_coef={coef:g}", ppo_config,
                              {**ppo, "model.reward": frontier.reward, "model.kl_coef": coef}, ppo_eval_every)  # fmt: skip
    for method, config, coefs in (("rloo", rloo_config, rloo_kl_coefs), ("grpo", grpo_config, grpo_kl_coefs)):
        for coef in coefs:  # the online family on the same prefixes, reward and budget of updates
            frontier.measured_run(f"{method}-kl_coef={coef:g}", method, f"kl_coef={coef:g}", config,
                                  {**ppo, "model.reward": frontier.reward, "model.kl_coef": coef}, ppo_eval_every)  # fmt: skip
    if ppo_rm_kl_coefs:
        print(f"[reward model] Bradley-Terry on the {count} pairs ({reward_config})", flush=True)
        rm = frontier.trained_model("reward-model", reward_config, {**trained_on, **(reward_overrides or {})},
                                    validate=True)  # fmt: skip
        print(f"[reward model] held-out pair accuracy {rm['val'].get('val/accuracy', float('nan')):.3f}", flush=True)
        stages["reward model"] = rm["seconds"]
        learned = {"class_path": "dpo_lit.rewards.RewardModel", "init_args": {"path": rm["model"], "chat": False}}
        for coef in ppo_rm_kl_coefs:
            frontier.measured_run(f"ppo-rm-kl_coef={coef:g}", "ppo-rm", f"kl_coef={coef:g}", ppo_config,
                                  {**ppo, "model.reward": learned, "model.kl_coef": coef}, ppo_eval_every)  # fmt: skip

    write_frontier_png(frontier.rows, out / "frontier.png", f"IMDb sentiment, {Path(model_name).name}: reward vs KL")
    judged = judge_samples(out / "samples")  # the paired gains and the second judge
    write_csv(judged, out / "judged.csv", JUDGED_COLUMNS)
    summary = {
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "seconds": time.time() - start, "stages": {**stages, **frontier.seconds},
        "classifier": info, "second_judge": vader_accuracy(test_file), "pairs": count, "sft_model": sft_model,
    }  # fmt: skip
    if ppo_rm_kl_coefs:
        summary["reward_model"] = {"model": rm["model"], "seconds": rm["seconds"], "val": rm["val"]}
    write_json(summary, out / "runs.json")
    print(format_table(frontier.rows), flush=True)
    if judged:
        print("\nPaired by prompt against the SFT model (classifier reward; VADER compound, the second judge)")
        print(format_table(judged), flush=True)
    print(f"\n{out / 'frontier.csv'}, {out / 'frontier.png'}, {out / 'classifier.json'} ({(time.time() - start) / 60:.1f} min)",
          flush=True)  # fmt: skip
    return frontier.rows
