"""Preference data: records → canonical examples → token ids → right-padded batches.

- :mod:`~dpo_lit.data.io` reads ``.jsonl``/``.json``/``.csv`` (optionally ``.gz``), ``.parquet``
  and Hub datasets, each record with its ``file:line`` location;
- :mod:`~dpo_lit.data.formats` has one adapter per format (standard, conversational, implicit
  prompt, OpenAI, unpaired, and sampled token ids: tokenized);
- :mod:`~dpo_lit.data.tokenize` builds ``prompt_ids`` and closed, truncated completions;
- :mod:`~dpo_lit.data.collate` pads them into the batch contract;
- :mod:`~dpo_lit.data.datamodule` ties it together for Lightning; :func:`load_examples` does
  the same without it;
- :mod:`~dpo_lit.data.sft` reads demonstrations (plain text, prompt/completion, conversations,
  the chosen side of pairs) for supervised fine-tuning into batches with ``labels``.
"""

from dpo_lit.data.collate import PreferenceCollator
from dpo_lit.data.datamodule import PreferenceDataModule
from dpo_lit.data.errors import DataError, DataReport, DataWarning
from dpo_lit.data.formats import PairedExample, UnpairedExample, detect_format, parse_record
from dpo_lit.data.io import read_records
from dpo_lit.data.load import load_examples, read_examples
from dpo_lit.data.sft import SFTDataModule
from dpo_lit.data.tokenize import TokenizedDataset, tokenize_examples

__all__ = [
    "DataError",
    "DataReport",
    "DataWarning",
    "PairedExample",
    "PreferenceCollator",
    "PreferenceDataModule",
    "SFTDataModule",
    "TokenizedDataset",
    "UnpairedExample",
    "detect_format",
    "load_examples",
    "parse_record",
    "read_examples",
    "read_records",
    "tokenize_examples",
]
