"""Pipelines: several Lightning jobs run from Python, and what they report.

- :mod:`~dpo_lit.pipelines.onpolicy`: generate → fit → paired evaluation (``dpo-lit onpolicy``,
  the quickstart, iterative DPO);
- :mod:`~dpo_lit.pipelines.report`: the per-round table, ``report.json`` and ``report.png``;
- :mod:`~dpo_lit.pipelines.frontier`: the DPO paper's IMDb reward–KL frontier (``dpo-lit frontier``),
  and :mod:`~dpo_lit.pipelines.frontier_report`, its CSVs, plot and second judge;
- :mod:`~dpo_lit.pipelines.plots`: a run's TensorBoard scalars as PNGs (``dpo-lit plots``).
"""
