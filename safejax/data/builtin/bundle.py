"""The built-in task for one seed as one object, :class:`BuiltinTask`, and its files (:meth:`BuiltinTask.write`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from safejax.data.builtin import oracle as O
from safejax.data.builtin import vocab as V
from safejax.data.builtin.task import (EVAL, HARM_CATEGORY_COUNTS, PROMPT_TEMPLATE, SAME_MODE_PROB,
                                       SFT_CATEGORY_MIX, SFT_MODE_MIX, TRAIN, _check_prob, _check_seed, _split,
                                       generate_preference_rows, generate_prompts, generate_sft_rows)
from safejax.data.builtin.tokenizer import build_tokenizer, tiny_llama_config


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    """The whole built-in task for one seed.

    Sizes: ``n_pref_train`` / ``n_pref_test`` preference rows (train prompts / held-out eval
    prompts), ``n_sft`` SFT rows, ``n_prompts_train`` / ``n_prompts_eval`` prompt rows (None = the
    whole pool of the split).

    ``harm_categories``: 1 (default) = the single-category task (one unsafe label; the demo's task, its data
    unchanged); 2 = the K = 2 task: same prompts and vocabulary, harmful topics split into the categories
    ``hazard`` (6 topics) and ``privacy`` (hacking, stalking) of :data:`V.HARM_CATEGORIES`, preference rows
    with ``response_{0,1}_harm_category`` dicts, an SFT corpus with its own base rate per category
    (:data:`SFT_CATEGORY_MIX`: hazard common, privacy rare) and an oracle that reports
    ``unsafe_rate_harmful/<category>`` (:data:`O.CATEGORY_ORACLE`).
    """

    seed: int = 0
    n_pref_train: int = 3000
    n_pref_test: int = 600
    n_sft: int = 2000
    n_prompts_train: int | None = None
    n_prompts_eval: int | None = None
    label_noise: float = 0.15
    safety_label_noise: float = 0.03
    harmful_fraction: float = 0.5
    eval_fraction: float = 0.25
    harm_categories: int = 1

    def __post_init__(self):
        _check_seed(self.seed)
        if self.harm_categories not in HARM_CATEGORY_COUNTS:
            raise ValueError(f"builtin task: harm_categories must be 1 or 2, got {self.harm_categories!r}")
        _check_prob("label_noise", self.label_noise)
        _check_prob("safety_label_noise", self.safety_label_noise)

    @property
    def oracle(self) -> O.Oracle:
        return O.CATEGORY_ORACLE if self.harm_categories == 2 else O.ORACLE

    @property
    def categories(self) -> tuple[str, ...]:
        """Names of the harm categories of the rows (``()`` for the single-category task)."""
        return self.oracle.categories

    def preference_rows(self, split: str = TRAIN) -> list[dict[str, Any]]:
        """PKU-schema rows: ``"train"`` on train prompts, ``"test"``/``"eval"`` on held-out prompts."""
        split = _split(split)
        n = self.n_pref_train if split == TRAIN else self.n_pref_test
        return generate_preference_rows(n, seed=self.seed, split=split, label_noise=self.label_noise,
                                        safety_label_noise=self.safety_label_noise,
                                        harmful_fraction=self.harmful_fraction, eval_fraction=self.eval_fraction,
                                        oracle=self.oracle if self.harm_categories == 2 else None)

    def sft_rows(self) -> list[dict[str, str]]:
        return generate_sft_rows(self.n_sft, seed=self.seed, harmful_fraction=self.harmful_fraction,
                                 eval_fraction=self.eval_fraction,
                                 category_mix=SFT_CATEGORY_MIX if self.harm_categories == 2 else None)

    def prompts(self, split: str = TRAIN) -> list[dict[str, str]]:
        split = _split(split)
        n = self.n_prompts_train if split == TRAIN else self.n_prompts_eval
        return generate_prompts(n, seed=self.seed, split=split, harmful_fraction=self.harmful_fraction,
                                eval_fraction=self.eval_fraction)

    def tokenizer(self, out_dir: str | os.PathLike | None = None):
        return build_tokenizer(out_dir)

    def model_config(self, **overrides: Any) -> dict[str, Any]:
        return tiny_llama_config(**overrides)

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write the task to ``out_dir`` and return the paths::

            pku/train.jsonl, pku/test.jsonl      preference rows (PKU-SafeRLHF schema)
            sft/train.jsonl                      Alpaca rows
            prompts/train.jsonl, prompts/eval.jsonl   {"prompt", "kind", "topic"}
            tokenizer/                           transformers tokenizer folder
            model_config.json                    tiny LlamaConfig (HF config.json format)
            task.json                            seed, sizes, noise, mode mix, vocabulary size

        Keys of the returned dict: preference_train, preference_test, sft, prompts_train,
        prompts_eval, tokenizer, model_config, task, root.  Folder specs work with the loaders,
        since file stems name their splits.
        """
        root = os.fspath(out_dir)
        paths = {
            "root": root,
            "preference_train": _write_jsonl(os.path.join(root, "pku", "train.jsonl"), self.preference_rows(TRAIN)),
            "preference_test": _write_jsonl(os.path.join(root, "pku", "test.jsonl"), self.preference_rows(EVAL)),
            "sft": _write_jsonl(os.path.join(root, "sft", "train.jsonl"), self.sft_rows()),
            "prompts_train": _write_jsonl(os.path.join(root, "prompts", "train.jsonl"), self.prompts(TRAIN)),
            "prompts_eval": _write_jsonl(os.path.join(root, "prompts", "eval.jsonl"), self.prompts(EVAL)),
        }
        tok_dir = os.path.join(root, "tokenizer")
        tok = self.tokenizer(tok_dir)
        paths["tokenizer"] = tok_dir
        cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **self.model_config(vocab_size=len(tok))}
        paths["model_config"] = os.path.join(root, "model_config.json")
        with open(paths["model_config"], "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        meta.update({"vocab_size": len(tok), "sft_mode_mix": SFT_MODE_MIX, "same_mode_prob": SAME_MODE_PROB,
                     "prompt_template": PROMPT_TEMPLATE, "eos_token": V.EOS_TOKEN})
        if self.harm_categories == 1:  # the single-category task.json stays as it always was
            del meta["harm_categories"]
        else:
            meta.update({"categories": {c: list(t) for c, t in V.HARM_CATEGORIES.items()},
                         "sft_category_mix": SFT_CATEGORY_MIX})
        paths["task"] = os.path.join(root, "task.json")
        with open(paths["task"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        return paths
