"""Tokenizer loading and special-token preparation (ALGORITHM.md §2.3, §8.4).

The reference adds any missing special token (pad ``<pad>``, eos ``</s>``, bos ``<s>``, unk
``<unk>``) so that the pad id differs from the EOS id: if pad were EOS, the EOS would be masked
out of every sequence and the score models would read the token before it.  Adding tokens grows
the vocabulary; the caller must grow the model's embedding matrix / LM head by the returned count
(new rows = mean of the old rows, §8.19).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from safejax.config import ConfigError
from safejax.errors import ModelFileError
from safejax.paths import resolve_tokenizer_path

log = logging.getLogger("safejax")

DEFAULT_PAD_TOKEN = "<pad>"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False,
                   local_files_only: bool | None = None, **kwargs: Any):
    """Load a tokenizer with ``transformers.AutoTokenizer`` (fast tokenizer, right padding).

    Args:
      path: a local folder (``tokenizer.json`` / ``tokenizer_config.json`` ...), a stage's out_dir (its
        ``hf/`` folder is used) or a hub id.  A path that looks local and does not exist fails at once.
      trust_remote_code: forwarded to ``AutoTokenizer.from_pretrained``.
      local_files_only: default ``True`` when ``path`` is a local folder, so loading never touches
        the network; for a hub id the HF offline environment variables decide.
      **kwargs: forwarded to ``AutoTokenizer.from_pretrained``.

    Raises:
      ValueError: nothing loadable at ``path`` (the message names the path).
    """
    import transformers

    path = os.fspath(path)
    if not path:
        raise ConfigError("load_tokenizer: no tokenizer path given (set model.path, or model.tokenizer)")
    expanded = resolve_tokenizer_path(path)  # a stage's out_dir -> out_dir/hf; a missing local path fails here
    if os.path.isdir(expanded):
        path = expanded
        if local_files_only is None:
            local_files_only = True
    elif os.path.exists(expanded):
        raise ModelFileError(f"load_tokenizer: {path!r} is a file; pass the folder that holds the tokenizer files")
    kwargs.setdefault("use_fast", True)
    kwargs.setdefault("padding_side", "right")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code,
            **({"local_files_only": local_files_only} if local_files_only is not None else {}), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"load_tokenizer: cannot load a tokenizer from {path!r}: {e}") from e


def prepare_tokenizer(tokenizer):
    """Add missing special tokens so that pad, eos, bos and unk all exist and ``pad != eos``.

    Missing tokens get the LLaMA defaults: pad ``<pad>``, eos ``</s>``, bos ``<s>``, unk ``<unk>``.
    A pad token equal to the EOS token is replaced by ``<pad>``.  The tokenizer is modified in place.

    Returns:
      ``(tokenizer, added)`` where ``added`` is how many new ids the vocabulary gained
      (``len(tokenizer)`` after minus before); grow the model embeddings by this many rows.

    Raises:
      ValueError: after preparation the pad id still equals the EOS id.
    """
    before = len(tokenizer)
    special: dict[str, str] = {}
    if tokenizer.eos_token is None:
        special["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special["unk_token"] = DEFAULT_UNK_TOKEN
    eos = special.get("eos_token", tokenizer.eos_token)
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        special["pad_token"] = DEFAULT_PAD_TOKEN
    if special:
        tokenizer.add_special_tokens(special)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ModelFileError(f"prepare_tokenizer: pad id {tokenizer.pad_token_id} equals the EOS id; "
                         f"pad {tokenizer.pad_token!r}, eos {tokenizer.eos_token!r}")
    return tokenizer, len(tokenizer) - before


def check_tokenizer(tokenizer, *, where: str) -> tuple[int, str]:
    """Check the tokenizer is ready for the data builders; return ``(pad_id, eos_string)``."""
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ValueError(f"{where}: the tokenizer has no EOS token; call prepare_tokenizer first")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{where}: the tokenizer has no pad token; call prepare_tokenizer first")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{where}: pad id equals the EOS id ({tokenizer.pad_token_id}); call prepare_tokenizer first")
    return int(tokenizer.pad_token_id), str(tokenizer.eos_token)


def encode_texts(tokenizer, texts: list[str], *, max_length: int) -> list[list[int]]:
    """Tokenize each whole text with ``add_special_tokens=True`` (BOS prepended for LLaMA), then
    truncate on the right to ``max_length`` (an over-long sample loses its EOS)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
    out = [list(ids)[:max_length] for ids in enc["input_ids"]]
    warn_if_unknown(tokenizer, out)
    return out


UNK_WARN_SHARE = 0.05  # warn when more than this share of the tokens is <unk>


def warn_if_unknown(tokenizer, seqs: list[list[int]], where: str = "") -> float:
    """Log a warning when more than :data:`UNK_WARN_SHARE` of the token ids in ``seqs`` are the unk id: the
    tokenizer does not cover the data (a different model's tokenizer, a wrong language or casing).
    Returns the share."""
    unk = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(s) for s in seqs)
    if unk is None or not total:
        return 0.0
    share = sum(s.count(unk) for s in seqs) / total
    if share > UNK_WARN_SHARE:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        log.warning("%stokenizer %s maps %.0f%% of %d tokens (%d texts) to %s: it does not cover this data "
                    "(a different model's tokenizer?); the model will mostly see unknown tokens",
                    f"{where}: " if where else "", name, 100 * share, total, len(seqs), tokenizer.unk_token)
    return share


def pad_sequences(seqs: list[list[int]], *, length: int, pad_id: int, side: str = "right"):
    """Pad token lists to a fixed ``length``.

    Returns:
      ``(ids [N, length] int32, mask [N, length] bool)``; ``mask`` is True on real tokens.  With
      ``side="left"`` every sequence ends at column ``length - 1``.
    """
    if side not in ("right", "left"):
        raise ValueError(f"pad side must be 'right' or 'left', got {side!r}")
    n = len(seqs)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask = np.zeros((n, length), dtype=bool)
    for i, s in enumerate(seqs):
        k = len(s)
        if k > length:
            raise ValueError(f"pad_sequences: sequence {i} has {k} tokens, more than the width {length}")
        if side == "right":
            ids[i, :k] = s
            mask[i, :k] = True
        elif k:
            ids[i, length - k:] = s
            mask[i, length - k:] = True
    return ids, mask
