"""Data pipeline: chat template, tokenizer preparation, dataset specs and loading through
``datasets``, preference / supervised / prompt-only builders, and deterministic batching.

All arrays are numpy with static shapes: sequences right-padded to ``max_length``, prompts
left-padded to ``prompt_width``; ids int32, masks bool (True = real token).

Typical use::

    tok, added = prepare_tokenizer(load_tokenizer("path/to/model"))
    rows = load_rows(["PKU-SafeRLHF/train:0.5", "/data/extra.jsonl"])
    pairs, report = build_reward_pairs(rows, tok, max_length=512)
    print(report)                       # kept / dropped by reason
    for batch in BatchIterator(pairs.as_dict(), 16, seed=0): ...

The built-in synthetic task lives in :mod:`safejax.data.builtin` (imported on its own).
"""

from safejax.data.batching import BatchIterator
from safejax.errors import DataError
from safejax.data.categories import PKU_HARM_CATEGORIES, category_groups
from safejax.data.preference import (
    CONFLICT,
    IDENTICAL,
    PreferenceArrays,
    SafetyPreferenceArrays,
    build_cost_pairs,
    build_reward_pairs,
)
from safejax.data.prompts import DUPLICATE, PromptArrays, build_prompts
from safejax.data.rows import DropReport
from safejax.data.sources import (
    DATASET_REGISTRY,
    DEFAULT_SEED,
    DatasetSpec,
    HubDataset,
    load_rows,
    load_source,
    parse_dataset_spec,
    sample_indices,
)
from safejax.data.supervised import PROMPT_TOO_LONG, SupervisedArrays, build_supervised
from safejax.data.template import (
    PROMPT_ASSISTANT,
    PROMPT_BEGIN,
    PROMPT_INPUT,
    PROMPT_USER,
    format_prompt,
    format_sample,
)
from safejax.data.tokenizer import encode_texts, load_tokenizer, pad_sequences, prepare_tokenizer

__all__ = [
    "BatchIterator",
    "CONFLICT",
    "DATASET_REGISTRY",
    "DEFAULT_SEED",
    "DUPLICATE",
    "DataError",
    "DatasetSpec",
    "DropReport",
    "HubDataset",
    "IDENTICAL",
    "PROMPT_ASSISTANT",
    "PROMPT_BEGIN",
    "PROMPT_INPUT",
    "PROMPT_TOO_LONG",
    "PROMPT_USER",
    "PreferenceArrays",
    "PromptArrays",
    "SafetyPreferenceArrays",
    "SupervisedArrays",
    "build_cost_pairs",
    "category_groups",
    "PKU_HARM_CATEGORIES",
    "build_prompts",
    "build_reward_pairs",
    "build_supervised",
    "encode_texts",
    "format_prompt",
    "format_sample",
    "load_rows",
    "load_source",
    "load_tokenizer",
    "pad_sequences",
    "parse_dataset_spec",
    "prepare_tokenizer",
    "sample_indices",
]
