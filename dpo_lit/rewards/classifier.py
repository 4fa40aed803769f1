"""A sentiment classifier trained on IMDb reviews, as the ground-truth reward of the DPO paper's
controlled-sentiment task (Rafailov et al. 2023, §6.1): the reward of a completion is the
classifier's probability that the prompt and completion together are a positive review.

The paper used a pretrained sentiment transformer; none can be had offline here, so the project
trains its own: TF-IDF over word 1- and 2-grams with sublinear term frequencies, then logistic
regression (scikit-learn, the ``frontier`` extra: ``pip install -e '.[frontier]'``). On IMDb's
25,000 test reviews it is about 90% accurate, and it trains in well under a minute on 2 cores::

    info = train_sentiment_classifier("imdb_train.jsonl.gz", "imdb_test.jsonl.gz", "runs/clf")
    reward = SentimentClassifier("runs/clf/classifier.pkl")
    reward(["This movie was"], [" a delight from start to end."])  # tensor([0.9...])

The model file is a pickle: load only files you made.
"""

from __future__ import annotations

import pickle
import random
import re
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo_lit.data.io import atomic_write, read_records, write_json
from dpo_lit.errors import ConfigError, DataError, MissingFileError
from dpo_lit.rewards.base import Reward

_TAGS = re.compile(r"<[^>]+>")


def clean_review(text: str) -> str:
    """IMDb's reviews carry ``<br />`` line breaks: HTML tags become spaces."""
    return _TAGS.sub(" ", text)


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the sentiment classifier needs scikit-learn: pip install -e '.[frontier]' (make imdb-frontier does it)"
        ) from None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return TfidfVectorizer, LogisticRegression, make_pipeline


def read_reviews(path: str, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels of an IMDb file (``text`` and ``label`` fields, as ``stanfordnlp/imdb``);
    with ``limit``, that many drawn at random (``seed``): IMDb's files are sorted by label."""
    texts, labels = [], []
    for record, location in read_records(path):
        if not isinstance(record.get("text"), str):
            raise DataError(location, "field 'text': expected a string")
        if record.get("label") not in (0, 1):
            raise DataError(location, f"field 'label': expected 0 or 1, got {record.get('label')!r}")
        texts.append(clean_review(record["text"]))
        labels.append(int(record["label"]))
    if not texts:
        raise DataError(path, "no reviews")
    if limit is not None and limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def train_sentiment_classifier(
    train_file: str, test_file: str, out_dir: str | Path, max_examples: int | None = None, c: float = 4.0
) -> dict[str, Any]:
    """Fit the classifier on ``train_file``, measure it on ``test_file``; write
    ``out_dir/classifier.pkl`` and ``out_dir/classifier.json`` (what it is, its test accuracy).

    Args:
        train_file: IMDb-format reviews to learn from.
        test_file: IMDb-format reviews to measure on (all of them).
        out_dir: where the two files go.
        max_examples: learn from ``max_examples`` training reviews drawn at random (None: all).
        c: the inverse L2 strength of the logistic regression.
    """
    tfidf, logistic, make_pipeline = _sklearn()
    import sklearn

    start = time.time()
    texts, labels = read_reviews(train_file, max_examples)
    if len(set(labels)) < 2:
        raise DataError(train_file, "the classifier needs reviews of both labels")
    model = make_pipeline(
        tfidf(ngram_range=(1, 2), min_df=2, max_df=0.9, sublinear_tf=True, strip_accents="unicode"),
        logistic(C=c, max_iter=1000),
    )
    model.fit(texts, labels)
    fit_seconds = time.time() - start
    test_texts, test_labels = read_reviews(test_file)
    predicted = model.predict(test_texts)
    accuracy = sum(int(p == y) for p, y in zip(predicted, test_labels)) / len(test_labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "classifier.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(model))
    info = {
        "test_accuracy": accuracy,
        "test_examples": len(test_labels),
        "train_examples": len(labels),
        "train_file": str(train_file),
        "test_file": str(test_file),
        "classifier": "TF-IDF over word 1-2-grams (min_df 2, max_df 0.9, sublinear tf) + logistic regression "
        f"(C={c}), scikit-learn {sklearn.__version__}; reward = P(positive) of prompt + completion",
        "fit_seconds": round(fit_seconds, 1),
        "path": str(out / "classifier.pkl"),
    }
    write_json(info, out / "classifier.json")
    return info


class SentimentClassifier(Reward):
    """The probability that ``prompt + completion`` is a positive review, by a classifier made by
    :func:`train_sentiment_classifier` (or any pickled scikit-learn model with ``predict_proba``
    over raw texts whose class 1 is "positive").

    Args:
        path: the pickled classifier (``classifier.pkl``).
        include_prompt: score the prompt and completion together (the review as a reader sees
            it), else the completion alone.
    """

    def __init__(self, path: str, include_prompt: bool = True) -> None:
        if not Path(path).is_file():
            raise MissingFileError(f"model.reward.init_args.path: classifier not found: {path}")
        self.path, self.include_prompt = path, include_prompt

    @cached_property
    def model(self) -> Any:
        _sklearn()
        return pickle.loads(Path(self.path).read_bytes())

    def score(self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None) -> Tensor:
        texts = [clean_review((p if self.include_prompt else "") + c) for p, c in zip(prompts, completions)]
        if not texts:
            return torch.zeros(0)
        return torch.as_tensor(self.model.predict_proba(texts)[:, 1], dtype=torch.float32)

    @property
    def name(self) -> str:
        return "sentiment"
