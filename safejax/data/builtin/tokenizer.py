"""Offline word-level tokenizer and tiny Llama config for the built-in task.

The tokenizer is a ``tokenizers`` WordLevel model over the task's closed word inventory
(:func:`safejax.data.builtin.vocab.vocabulary`), so every task word is exactly one token and
nothing has to be downloaded or trained on external text:

* ids 0..3 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), ``<pad>`` (pad != EOS);
* pre-tokenizer: split on whitespace, then isolate every punctuation character, so
  ``"ASSISTANT:sure"`` becomes ``ASSISTANT``, ``:``, ``sure`` (the chat template has no space after
  ``ASSISTANT:``);
* special tokens are matched before pre-tokenization, so a literal ``"</s>"`` in text is the EOS id;
* post-processor prepends ``<s>`` when ``add_special_tokens=True`` (LLaMA convention);
* no normalizer: the template words are uppercase, task words lowercase, anything else is ``<unk>``.

It is wrapped as a ``transformers.PreTrainedTokenizerFast`` and reloads offline with
``AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import os
from typing import Any

from safejax.data.builtin import vocab as V

MODEL_MAX_LENGTH = 64


def build_tokenizer_object():
    """The raw ``tokenizers.Tokenizer`` (WordLevel + whitespace/punctuation pre-tokenizer + BOS)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    words = V.vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    if len(vocab) != len(words):
        raise ValueError("builtin tokenizer: the vocabulary has duplicate entries")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=V.UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in V.SPECIAL_TOKENS])
    bos_id = vocab[V.BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{V.BOS_TOKEN} $A", pair=f"{V.BOS_TOKEN} $A $B:1", special_tokens=[(V.BOS_TOKEN, bos_id)])
    return tok


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """Build the task tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Args:
      out_dir: if given, the tokenizer is saved there with ``save_pretrained`` (tokenizer.json,
        tokenizer_config.json, special_tokens_map.json); ``AutoTokenizer.from_pretrained(out_dir)``
        then loads it offline.

    Returns:
      The tokenizer (right padding, ``model_max_length`` = 64).
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(),
        bos_token=V.BOS_TOKEN, eos_token=V.EOS_TOKEN, pad_token=V.PAD_TOKEN, unk_token=V.UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", truncation_side="right",
        clean_up_tokenization_spaces=False)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(os.fspath(out_dir))
    return fast


def special_token_ids() -> dict[str, int]:
    """``{"unk_token_id", "bos_token_id", "eos_token_id", "pad_token_id"}`` of the task vocabulary."""
    words = V.vocabulary()
    return {"unk_token_id": words.index(V.UNK_TOKEN), "bos_token_id": words.index(V.BOS_TOKEN),
            "eos_token_id": words.index(V.EOS_TOKEN), "pad_token_id": words.index(V.PAD_TOKEN)}


def vocab_size() -> int:
    """Number of tokens of the task tokenizer."""
    return len(V.vocabulary())


def tiny_llama_config(vocab_size: int | None = None, *, hidden_size: int = 64, intermediate_size: int = 128,
                      num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                      max_position_embeddings: int = MODEL_MAX_LENGTH, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``transformers.LlamaConfig`` for the demo's tiny model.

    Args:
      vocab_size: embedding rows (default: the task tokenizer's size).
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        max_position_embeddings: model shape (defaults: 64, 128, 2, 4, 2, 64; head_dim = 16).
      overrides: any other LlamaConfig field.

    Returns:
      A JSON-serialisable dict; ``LlamaConfig(**d)`` builds the config, and written as
      ``config.json`` (with ``model_type``) it is a HF config.
    """
    if vocab_size is None:
        vocab_size = len(V.vocabulary())
    if vocab_size < len(V.vocabulary()):
        raise ValueError(f"tiny_llama_config: vocab_size {vocab_size} is smaller than the task vocabulary "
                         f"({len(V.vocabulary())} tokens)")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(f"tiny_llama_config: hidden_size {hidden_size}, num_attention_heads {num_attention_heads} "
                         f"and num_key_value_heads {num_key_value_heads} must divide evenly")
    ids = special_token_ids()
    cfg: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    cfg.update(overrides)
    return cfg
