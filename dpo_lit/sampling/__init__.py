"""On-policy sampling: completions with their token ids kept as sampled, KL(π‖π_ref) estimated on
them, scored samples turned into pairs, and the ``dpo-lit predict`` module that does all three.

- :mod:`~dpo_lit.sampling.sample`: :func:`sample` (ids, finished flag, log π of each completion);
- :mod:`~dpo_lit.sampling.kl`: the sequence-level KL estimator with its standard error;
- :mod:`~dpo_lit.sampling.pairs`: best-vs-worst or all pairs, in the ``tokenized`` data format;
- :mod:`~dpo_lit.sampling.predict`: :class:`GenerationModule`, :class:`PromptDataModule`,
  :class:`WritePairs`.
"""

from dpo_lit.sampling.kl import KLEstimate, estimate_kl, kl_from_samples, mean_se
from dpo_lit.sampling.pairs import PairStats, build_pairs
from dpo_lit.sampling.sample import Sample, sample

__all__ = ["KLEstimate", "PairStats", "Sample", "build_pairs", "estimate_kl", "kl_from_samples", "mean_se", "sample"]
