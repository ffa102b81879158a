"""Batched answer generation over a prompt set and scoring with reward / cost models, on a device mesh.

The host side is thin: prompts are built once (:func:`load_prompt_set`: chat template, dedupe, left padding to
a fixed width ``P``), then fixed-size batches ``[B, P]`` are placed on the mesh (rows split over
``data x fsdp``, like training) and handed to one jitted sampler per model architecture; the last batch is
padded by repeating rows and the extra rows are dropped.  Outputs come back replicated, so every host holds the
full result.

Scoring reads a score model's ``end_scores`` (the score at the last real token):

* ``"ids"``: directly on the generated ``[N, P+T]`` sequences (left-padded prompt, response, pad after EOS);
  valid only when the score model's tokenizer has the same vocabulary as the policy's;
* ``"text"``: re-tokenize ``format_prompt(prompt) + answer (+ EOS when the policy emitted one)`` with the score
  model's own tokenizer, right-padded to ``max_length``;
* ``"auto"``: ``ids`` when the vocabularies match, else ``text``.

Typical use::

    ps = load_prompt_set(["prompts.jsonl"], policy.tokenizer, prompt_width=64)
    gens = generate_answers(policy, ps, SamplingConfig(max_new_tokens=32), batch_size=16, mesh=mesh, seed=0)
    rewards, how = score_generations(rm, policy.tokenizer, ps, gens, batch_size=16, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from safejax import parallel
from safejax.config import ConfigError
from safejax.data import build_prompts, encode_texts, format_prompt, load_rows, pad_sequences
from safejax.errors import DataError, ModelFileError
from safejax.generation import SamplingConfig, generate, positions_from_mask
from safejax.metrics import progress as progress_bar
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.paths import missing_path_error, resolve_model_dir
from safejax.sections import ModelSection

log = logging.getLogger("safejax")

__all__ = [
    "PromptSet",
    "LoadedModel",
    "Generations",
    "SCORE_INPUTS",
    "load_prompt_set",
    "load_model",
    "parse_named_path",
    "same_vocabulary",
    "generate_answers",
    "score_ids",
    "score_texts",
    "score_generations",
    "run_batched",
    "rows_per_batch_multiple",
]

SCORE_INPUTS = ("auto", "ids", "text")


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """``N`` distinct prompts, formatted and left-padded to ``P = prompt_width``.

    prompts: ``[N]`` raw user prompts (a string, or a dialogue list ending on a user turn), as in the data.
    meta: ``[N]`` dicts of extra fields kept from each prompt's row (e.g. ``kind``, ``category``).
    prompt_ids: ``[N, P]`` int32, pad id on the left; prompt_mask: ``[N, P]`` bool (True on real tokens).
    report: what the builder kept and dropped (duplicates, too long prompts, bad rows).
    """

    prompts: list
    meta: list[dict]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    report: Any

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.prompt_ids.shape[1])


def _raw_prompt(row: dict) -> Any:
    """The user prompt of a row: ``prompt``, or Alpaca ``instruction`` [+ " " + ``input``]."""
    if "prompt" in row and row["prompt"] is not None:
        return row["prompt"]
    inp = row.get("input") or ""
    return row["instruction"] + (" " + inp if inp else "")


def load_prompt_set(specs: Sequence[str] | Any, tokenizer, *, prompt_width: int, max_prompts: int = 0,
                    keep_fields: Sequence[str] = (), skip_bad_rows: bool = False) -> PromptSet:
    """Load prompt rows (dataset specs, see :func:`safejax.data.load_rows`, or a list of dicts) and build them.

    Args:
      specs: dataset specs (``"PKU-SafeRLHF/test"``, ``"/data/prompts.jsonl"``, ...) or already loaded rows.
      tokenizer: the policy's prepared tokenizer.
      prompt_width: ``P``; longer prompts are dropped and counted in the report.
      max_prompts: keep the first ``max_prompts`` distinct prompts (0 = all).
      keep_fields: row fields copied into ``meta`` when present (e.g. ``kind``, ``category``).
      skip_bad_rows: count malformed rows instead of raising.
    """
    if isinstance(specs, str):
        specs = [specs]
    if isinstance(specs, (list, tuple)) and specs and all(isinstance(s, str) for s in specs):
        rows = load_rows(list(specs))
    elif isinstance(specs, (list, tuple)) and not specs:
        raise ConfigError("config key 'prompts': no prompt dataset given")
    else:
        rows = specs
    if max_prompts < 0:
        raise ConfigError(f"max_prompts: must be >= 0, got {max_prompts}")
    built, report = build_prompts(rows, tokenizer, prompt_width=prompt_width, skip_bad_rows=skip_bad_rows)
    n = len(built) if max_prompts == 0 else min(max_prompts, len(built))
    if n == 0:
        raise DataError(f"prompts: no usable prompt left ({report}); check the specs and prompt_width={prompt_width}")
    prompts, meta = [], []
    for i in built.row_index[:n]:
        row = rows[int(i)]
        prompts.append(_raw_prompt(row))
        meta.append({k: row[k] for k in keep_fields if k in row and row[k] is not None})
    return PromptSet(prompts, meta, built.prompt_ids[:n], built.prompt_mask[:n], report)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """A model on the mesh: ``mdef.merge(params)`` rebuilds the module inside jit."""

    name: str
    path: str
    mdef: Any            # safejax.models.functional.ModelDef
    params: dict         # pure dict of arrays, already in their NamedShardings
    tokenizer: Any
    config: Any = None   # safejax.models.ModelConfig (vocab_size etc.)


def parse_named_path(entry: str, key: str) -> tuple[str, str]:
    """``"name=path"`` -> ``(name, path)``; a bare path is named after its folder (``runs/sft/hf`` -> ``sft``)."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"config key '{key}': expected 'name=path' or a model folder, got {entry!r}")
    entry = entry.strip()
    if "=" in entry and not os.path.exists(entry):
        name, path = (s.strip() for s in entry.split("=", 1))
        if not name or not path:
            raise ConfigError(f"config key '{key}': {entry!r} is not of the form name=path")
        return name, path
    norm = os.path.normpath(entry)
    base = os.path.basename(norm)
    if base == "hf":
        base = os.path.basename(os.path.dirname(norm)) or base
    return base, entry


def load_model(path: str, mesh, *, model_type: str, name: str = "", tokenizer_path: str = "",
               dtype: str = "float32", rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> LoadedModel:
    """Load an HF folder (or a stage's out_dir: its ``hf/`` folder) as a ``causal_lm`` (policy) or ``score``
    model straight into the mesh's shardings (placed by ``rules``), with its prepared tokenizer (``tokenizer_path`` or
    the model folder)."""
    if not path:
        raise ConfigError(f"no model folder given for {name or model_type}")
    if not os.path.isdir(os.path.expanduser(path)):
        raise missing_path_error(f"{name or model_type}: model folder", path)
    section = ModelSection(path=resolve_model_dir(path, f"{name or model_type}: model folder"),
                           tokenizer=tokenizer_path, dtype=dtype)  # a stage's out_dir -> its hf/ folder
    tok = load_tokenizer_for(section)
    model = load_model_for(section, mesh, model_type=model_type, tokenizer=tok, rules=rules)
    if model_type == "score" and getattr(model, "score_dim", 1) != 1:
        raise ModelFileError(f"{path}: score model has score_dim={model.score_dim}; evaluation needs a scalar score")
    mdef, params = split_model(model)
    return LoadedModel(name=name or os.path.basename(os.path.normpath(path)), path=path, mdef=mdef, params=params,
                       tokenizer=tok, config=model.config)


def same_vocabulary(tok_a, tok_b) -> bool:
    """Whether two tokenizers map every token string to the same id (special tokens included)."""
    if tok_a is tok_b:
        return True
    return (tok_a.get_vocab() == tok_b.get_vocab() and tok_a.eos_token_id == tok_b.eos_token_id
            and tok_a.pad_token_id == tok_b.pad_token_id and tok_a.bos_token_id == tok_b.bos_token_id)


# ----------------------------------------------------------------------------- batching on the mesh


def rows_per_batch_multiple(mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> int:
    """A batch's rows are split over the mesh by the rules table's ``batch`` rule (default ``data`` x ``fsdp``), so
    its size must be a multiple of this."""
    return parallel.batch_shards(mesh, rules)


def run_batched(fn: Callable[[dict, int], Any], arrays: dict, batch_size: int, mesh, *, desc: str = "",
                progress: bool = False, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> Any:
    """Apply ``fn(device_batch, batch_index)`` over fixed-size batches of ``arrays`` (equal-length numpy).

    Every batch has exactly ``batch_size`` rows (static shapes: one compilation); the last one is padded by
    repeating rows from the start and the extra outputs are dropped. Batches are placed with the rows split by the
    ``batch`` rule of ``rules``.
    ``fn`` must return a pytree of arrays with a leading batch axis; the result is the numpy
    concatenation over all ``N`` rows.
    """
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError(f"{desc or 'run_batched'}: no rows")
    mult = rows_per_batch_multiple(mesh, rules)
    if batch_size < 1 or batch_size % mult:
        raise ConfigError(f"batch_size={batch_size} must be a positive multiple of {mult} (the mesh axes the batch "
                         "rule splits rows over: data x fsdp by default)")
    n_batches = -(-n // batch_size)
    bar = progress_bar(n_batches, desc, progress)
    outs = []
    for b in range(n_batches):
        start = b * batch_size
        idx = np.arange(start, start + batch_size) % n
        # every process holds the whole batch: rows split by the "batch" rule, each process fills its shards
        batch = parallel.host_local_to_global({k: np.asarray(v)[idx] for k, v in arrays.items()}, mesh, rules,
                                              global_rows=batch_size)
        out = jax.device_get(fn(batch, b))
        keep = min(batch_size, n - start)
        outs.append(jax.tree.map(lambda x: np.asarray(x)[:keep], out))
        bar.update(1)
    bar.close()
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _abstract_key(mdef) -> tuple:
    leaves, treedef = jax.tree.flatten(mdef.abstract_params())
    return (mdef.graphdef, treedef, tuple((x.shape, str(x.dtype)) for x in leaves))


_SAMPLERS: dict = {}
_SCORERS: dict = {}


def _sampler(mdef, mesh, sampling: SamplingConfig, eos_id: int, pad_id: int,
             rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """One jitted ``sample(params, ids [B,P], mask [B,P], key) -> (sequences, mask) [B, P+T]`` per architecture."""
    key = (_abstract_key(mdef), mesh, tuple(rules), sampling, int(eos_id), int(pad_id))
    fn = _SAMPLERS.get(key)
    if fn is None:
        rep = NamedSharding(mesh, P())

        def sample(params, ids, mask, rng):
            out = generate(mdef.merge(params), ids, mask, rng, sampling, eos_token_id=eos_id, pad_token_id=pad_id)
            return out.sequences, out.attention_mask

        fn = _SAMPLERS[key] = parallel.mesh_jit(sample, mesh=mesh, rules=rules, out_shardings=(rep, rep))
    return fn


def _scorer(mdef, mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """One jitted ``ends(params, ids [B,T], mask [B,T]) -> end_scores [B]`` per score-model architecture."""
    key = (_abstract_key(mdef), mesh, tuple(rules))
    fn = _SCORERS.get(key)
    if fn is None:
        rep = NamedSharding(mesh, P())

        def ends(params, ids, mask):
            return mdef.merge(params)(ids, attention_mask=mask, positions=positions_from_mask(mask)).end_scores

        fn = _SCORERS[key] = parallel.mesh_jit(ends, mesh=mesh, rules=rules, out_shardings=rep)
    return fn


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Generations:
    """One policy's answers to a :class:`PromptSet` (row ``i`` answers prompt ``i``).

    sequences: ``[N, P+T]`` int32: left-padded prompt, then the response, pad after EOS.
    attention_mask: ``[N, P+T]`` bool: True on prompt and response tokens (EOS included).
    response_lengths: ``[N]`` int32 generated tokens (EOS included); ended: ``[N]`` bool, EOS was emitted.
    answers: ``[N]`` decoded response texts (special tokens skipped).
    """

    sequences: np.ndarray
    attention_mask: np.ndarray
    response_lengths: np.ndarray
    ended: np.ndarray
    answers: list[str]
    prompt_width: int


def generate_answers(policy: LoadedModel, prompt_set: PromptSet, sampling: SamplingConfig, *, batch_size: int,
                     mesh, seed: int, progress: bool = False, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES
                     ) -> Generations:
    """Sample one answer per prompt with the jitted sampler (batch ``b`` uses ``fold_in(key(seed), b)``)."""
    tok = policy.tokenizer
    sample = _sampler(policy.mdef, mesh, sampling, tok.eos_token_id, tok.pad_token_id, rules)
    base = jax.random.key(seed)

    def fn(batch, b):
        seqs, mask = sample(policy.params, batch["prompt_ids"], batch["prompt_mask"], jax.random.fold_in(base, b))
        return {"sequences": seqs, "attention_mask": mask}

    out = run_batched(fn, {"prompt_ids": prompt_set.prompt_ids, "prompt_mask": prompt_set.prompt_mask}, batch_size,
                      mesh, desc=f"generate {policy.name}", progress=progress, rules=rules)
    p = prompt_set.width
    seqs, mask = out["sequences"].astype(np.int32), out["attention_mask"].astype(bool)
    resp, rmask = seqs[:, p:], mask[:, p:]
    ended = np.any((resp == tok.eos_token_id) & rmask, axis=1)
    answers = [tok.decode([int(t) for t, m in zip(r, k) if m], skip_special_tokens=True) for r, k in zip(resp, rmask)]
    return Generations(seqs, mask, rmask.sum(axis=1).astype(np.int32), ended, answers, p)


# ----------------------------------------------------------------------------- scoring


def score_ids(scorer: LoadedModel, ids: np.ndarray, mask: np.ndarray, *, batch_size: int, mesh,
              progress: bool = False, desc: str = "", rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES
              ) -> np.ndarray:
    """``[N]`` float32 end scores of token sequences ``ids [N, T]`` with ``mask [N, T]`` (any padding side)."""
    vocab = scorer.config.vocab_size if scorer.config is not None else None
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise ModelFileError(f"{scorer.path}: token id {int(ids.max())} is outside the score model's vocabulary of "
                         f"{vocab}; score the decoded texts instead (score_input=text)")
    ends = _scorer(scorer.mdef, mesh, rules)

    def fn(batch, b):  # noqa: ARG001
        return ends(scorer.params, batch["ids"], batch["mask"])

    return run_batched(fn, {"ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, bool)}, batch_size, mesh,
                       desc=desc or f"score {scorer.name}", progress=progress, rules=rules).astype(np.float32)


def score_texts(scorer: LoadedModel, prompts: Sequence[Any], answers: Sequence[str], *, ended: Sequence[bool] | None,
                max_length: int, batch_size: int, mesh, progress: bool = False, desc: str = "",
                rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> tuple[np.ndarray, int]:
    """Re-tokenize ``format_prompt(prompt) + answer (+ EOS)`` with the score model's tokenizer and score it.

    ``ended[i]`` says whether answer ``i`` was closed by EOS (None = all were). Sequences are truncated on the
    right to ``max_length``. Returns ``(scores [N] float32, number of truncated sequences)``.
    """
    tok = scorer.tokenizer
    if len(prompts) != len(answers):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(answers)} answers")
    if ended is None:
        ended = [True] * len(answers)
    eos = tok.eos_token
    texts = [format_prompt(p, eos) + a + (eos if e else "") for p, a, e in zip(prompts, answers, ended)]
    full = tok(texts, add_special_tokens=True)["input_ids"]
    n_trunc = sum(len(x) > max_length for x in full)
    seqs = encode_texts(tok, texts, max_length=max_length)
    ids, mask = pad_sequences(seqs, length=max_length, pad_id=tok.pad_token_id)
    return (score_ids(scorer, ids, mask, batch_size=batch_size, mesh=mesh, progress=progress, desc=desc, rules=rules),
            n_trunc)


def score_generations(scorer: LoadedModel, policy_tokenizer, prompt_set: PromptSet, gens: Generations, *,
                      batch_size: int, mesh, mode: str = "auto", max_length: int = 0, policy_vocab: int | None = None,
                      progress: bool = False, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES
                      ) -> tuple[np.ndarray, str]:
    """``[N]`` end scores of a policy's answers, and the input mode used (``"ids"`` or ``"text"``).

    ``mode="auto"`` scores the generated ids directly when the score model's tokenizer has the policy's
    vocabulary (and its embedding covers the policy's ``policy_vocab`` rows), else re-tokenizes the texts
    (``max_length`` 0 = the generated width ``P+T``).
    """
    if mode not in SCORE_INPUTS:
        raise ConfigError(f"config key 'score_input' = {mode!r} must be one of {list(SCORE_INPUTS)}")
    match = same_vocabulary(policy_tokenizer, scorer.tokenizer)
    fits = policy_vocab is None or scorer.config is None or scorer.config.vocab_size >= policy_vocab
    if mode == "ids" and not match:
        raise ConfigError(f"score_input=ids: the tokenizer of {scorer.path} differs from the policy's; "
                         "use score_input=text or auto")
    use = "ids" if (mode == "ids" or (mode == "auto" and match and fits)) else "text"
    desc = f"score {scorer.name}"
    if use == "ids":
        return score_ids(scorer, gens.sequences, gens.attention_mask, batch_size=batch_size, mesh=mesh,
                         progress=progress, desc=desc, rules=rules), use
    width = max_length or gens.sequences.shape[1]
    scores, n_trunc = score_texts(scorer, prompt_set.prompts, gens.answers, ended=gens.ended, max_length=width,
                                  batch_size=batch_size, mesh=mesh, progress=progress, desc=desc, rules=rules)
    if n_trunc:
        log.warning("%s: %d of %d re-tokenized answers were longer than %d tokens and were truncated", scorer.name,
                    n_trunc, len(gens.answers), width)
    return scores, use
