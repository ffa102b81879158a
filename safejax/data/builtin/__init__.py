"""The built-in synthetic safety task (the embedded default of ``safejax demo``).

A procedurally generated, seeded task in the PKU-SafeRLHF schema with a known ground truth:

* :func:`generate_prompts` - benign and harmful requests, disjoint train / eval pools;
* :func:`generate_preference_rows` - PKU-SafeRLHF rows labelled by the oracle with label noise;
* :func:`generate_sft_rows` - Alpaca rows whose policy complies unsafely with ~50% of harmful prompts;
* :func:`oracle_score` / :class:`Oracle` - helpfulness and harmfulness of any text;
* :func:`evaluate_responses` - unsafe rate, helpfulness and refusal rate of a policy's answers;
* :func:`build_tokenizer` / :func:`tiny_llama_config` - offline word-level tokenizer, tiny Llama;
* :class:`BuiltinTask` - all of it for one seed, with :meth:`BuiltinTask.write`;
  ``BuiltinTask(harm_categories=2)`` is the K = 2 variant (harm categories ``hazard`` and ``privacy``, PKU
  ``response_*_harm_category`` labels, per-category base rates and oracle unsafe rates).
"""

from safejax.data.builtin.oracle import (
    CATEGORY_ORACLE,
    ORACLE,
    Oracle,
    OracleScore,
    ResponseFeatures,
    category_keys,
    classify_prompt,
    evaluate_responses,
    find_topic,
    harm_categories,
    is_refusal,
    oracle_score,
    response_features,
    response_mode,
    severity_level,
)
from safejax.data.builtin.bundle import BuiltinTask
from safejax.data.builtin.task import (
    PKU_FIELDS,
    PROMPT_TEMPLATE,
    SFT_CATEGORY_MIX,
    SFT_MODE_MIX,
    format_sequence,
    generate_preference_rows,
    generate_prompts,
    generate_response,
    generate_sft_rows,
    prompt_pools,
    topic_prompts,
)
from safejax.data.builtin.tokenizer import build_tokenizer, special_token_ids, tiny_llama_config, vocab_size
from safejax.data.builtin.vocab import (
    BENIGN,
    HARMFUL,
    HARM_CATEGORIES,
    HAZARD,
    HELP,
    MODES,
    RAMBLE,
    REFUSE,
    TOPICS,
    task_words,
    vocabulary,
)

__all__ = [
    "BENIGN", "CATEGORY_ORACLE", "HARM_CATEGORIES", "HARMFUL", "HAZARD", "HELP", "MODES", "RAMBLE", "REFUSE",
    "TOPICS", "ORACLE", "PKU_FIELDS", "PROMPT_TEMPLATE", "SFT_CATEGORY_MIX", "SFT_MODE_MIX", "BuiltinTask",
    "Oracle", "OracleScore", "ResponseFeatures", "build_tokenizer", "category_keys", "classify_prompt",
    "evaluate_responses", "find_topic", "format_sequence", "generate_preference_rows", "generate_prompts",
    "generate_response", "generate_sft_rows", "harm_categories", "is_refusal", "oracle_score", "prompt_pools",
    "response_features", "response_mode", "severity_level", "special_token_ids", "task_words", "tiny_llama_config",
    "topic_prompts", "vocab_size", "vocabulary",
]
