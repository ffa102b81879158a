"""The PyTorch/transformers side of the parity tests: forwards under the repo's position rule, greedy
``generate`` padded to a fixed width, and PartitionSpec inspection of sharded arrays."""

from __future__ import annotations

import numpy as np


def positions(mask: np.ndarray) -> np.ndarray:
    """The repo's rule everywhere: ``max(cumsum(mask) - 1, 0)``."""
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def _call(module, ids, mask):
    import torch

    with torch.no_grad():
        return module(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions(mask), dtype=torch.long))


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, T, V]`` logits of a transformers causal LM given explicit position ids."""
    return _call(model, ids, mask).logits.numpy()


def hf_hidden(backbone, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, T, D]`` last hidden states of a transformers backbone (``LlamaModel``, ``GPT2Model``, ...)."""
    return _call(backbone, ids, mask).last_hidden_state.numpy()


def hf_greedy_generate(hf, ids: np.ndarray, mask: np.ndarray, *, new_tokens: int, pad: int, eos: int, bos: int,
                       repetition_penalty: float = 1.0) -> np.ndarray:
    """HF greedy decoding; rows that stopped early (and a batch that stopped early) are padded with ``pad``
    to ``P + new_tokens`` columns."""
    import torch
    import transformers

    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad,
                                       eos_token_id=eos, repetition_penalty=repetition_penalty, bos_token_id=bos)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                          generation_config=gc).numpy()
    full = np.full((ids.shape[0], ids.shape[1] + new_tokens), pad, np.int64)
    full[:, :out.shape[1]] = out
    return full


def spec_of(x):
    """The array's PartitionSpec with trailing Nones dropped (``P('a', None) == P('a')``)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert isinstance(x.sharding, NamedSharding)
    parts = list(x.sharding.spec)
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def left_padded_prompts(lengths, width: int, vocab: int, pad: int, *, seed: int = 0, low: int = 3):
    """(ids ``[len(lengths), width]`` int32, mask bool): row i has ``lengths[i]`` random ids in ``[low, vocab)``
    at the right end, ``pad`` before them."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), width), pad, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(low, vocab, size=n)
        mask[i, width - n:] = True
    return ids, mask


def three_row_batch(vocab: int, length: int):
    """(ids ``[3, length]``, int32 mask): row 0 unpadded, rows 1 and 2 left-padded by 3 and 6."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, vocab, (3, length)).astype(np.int32)
    mask = np.ones((3, length), np.int32)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask
