"""Loading models and tokenizers for a stage, straight into the mesh's shardings."""

from __future__ import annotations

import logging
from typing import Any

from safejax.config import ConfigError
from safejax.data import load_tokenizer, prepare_tokenizer
from safejax.models.hf import check_tokenizer_fits, load_pretrained, resize_token_embeddings
from safejax.parallel import LOGICAL_AXIS_RULES, Rules
from safejax.paths import resolve_model_dir
from safejax.sections import ModelSection

log = logging.getLogger("safejax")


def load_tokenizer_for(section: ModelSection):
    if not section.tokenizer:
        resolve_model_dir(section.path)  # a missing / run-without-hf/ model folder is named as the model's
    path = section.tokenizer or section.path
    tok = load_tokenizer(path)
    tok, added = prepare_tokenizer(tok)
    if added:
        log.info("tokenizer %s: added %d special token(s); pad id %d, eos id %d", path, added, tok.pad_token_id,
                 tok.eos_token_id)
    return tok


def load_model_for(section: ModelSection | str, mesh, *, model_type: str | None, tokenizer=None,
                   dtype: str | None = None, attention: str | None = None, score_dim: int | None = None,
                   rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Load an HF folder as a CausalLM (``model_type='causal_lm'``) or ScoreModel (``'score'``),
    grow its embeddings when the tokenizer gained special tokens, and check the tokenizer fits.
    A bare path takes ``dtype`` and ``attention`` (defaults of :class:`ModelSection` when None);
    ``score_dim``: outputs of a fresh score head (a score checkpoint must have exactly that many).  Params are
    placed on ``mesh`` by ``rules`` (the run's logical-axis table)."""
    if isinstance(section, str):
        section = ModelSection(path=section, dtype=dtype or "float32", attention=attention or "einsum")
    if not section.path:
        raise ConfigError(f"no model path given (model_type={model_type})")
    model = load_pretrained(section.path, dtype=section.dtype, model_type=model_type, mesh=mesh, rules=rules,
                            remat=section.remat, scan_layers=section.scan_layers, attention_impl=section.attention,
                            score_dim=score_dim)
    if tokenizer is not None:
        base = int(getattr(tokenizer, "vocab_size", len(tokenizer)))
        if base > model.config.vocab_size:
            # a different tokenizer, not just added special tokens: never paper over it by resizing
            raise ConfigError(f"tokenizer {section.tokenizer or section.path} has a base vocabulary of {base} "
                             f"tokens but the model at {section.path} has {model.config.vocab_size} embedding "
                             "rows: the tokenizer does not belong to this model")
        if len(tokenizer) > model.config.vocab_size:  # special tokens added by prepare_tokenizer
            model = resize_token_embeddings(model, len(tokenizer), rules)
        check_tokenizer_fits(tokenizer, model.config, section.path)
    return model
