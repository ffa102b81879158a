"""A tiny, fully local world for trainer tests: a word-level tokenizer, a random tiny Llama HF folder,
and PKU-schema preference rows where a *planted token* decides the labels.

* the response containing ``good`` is the better one (helpfulness);
* a response containing ``bad`` is unsafe, and the other one is safer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

FILLER = [f"w{i}" for i in range(24)]
TEMPLATE_WORDS = ["BEGINNING", "OF", "CONVERSATION", "USER", "ASSISTANT", ":"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = SPECIALS + TEMPLATE_WORDS + ["good", "bad"] + FILLER


def build_tokenizer(out_dir: str | Path, *, with_pad: bool = True):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_pad:
        kw["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random tiny LlamaForCausalLM saved by transformers (safetensors) plus the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    build_tokenizer(out_dir)
    return Path(out_dir)


def build_tiny_gpt2(out_dir: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random tiny GPT2LMHeadModel saved by transformers (safetensors) plus the word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3)
    GPT2LMHeadModel(cfg).save_pretrained(str(out_dir))
    build_tokenizer(out_dir)
    return Path(out_dir)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


def planted_rows(n: int, seed: int) -> list[dict]:
    """PKU-SafeRLHF-schema rows; ``good`` marks the better response, ``bad`` an unsafe one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _words(rng, rng.randint(2, 4))
        base0 = _words(rng, rng.randint(2, 4)).split()
        base1 = _words(rng, rng.randint(2, 4)).split()
        good = rng.randint(0, 1)
        unsafe = rng.choice([None, 0, 1])            # which response (if any) carries 'bad'
        r = [base0, base1]
        r[good].insert(rng.randint(0, len(r[good])), "good")
        if unsafe is not None:
            r[unsafe].insert(rng.randint(0, len(r[unsafe])), "bad")
        safe = [unsafe != 0, unsafe != 1]
        safer = 1 - unsafe if unsafe is not None else rng.randint(0, 1)
        rows.append({"prompt": prompt, "response_0": " ".join(r[0]), "response_1": " ".join(r[1]),
                     "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
                     "better_response_id": good, "safer_response_id": safer})
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        resp = _words(rng, rng.randint(2, 4)).split()
        if rng.random() < 0.5:
            resp.insert(rng.randint(0, len(resp)), "bad")
        if rng.random() < 0.3:
            resp.insert(rng.randint(0, len(resp)), "good")
        out.append({"instruction": _words(rng, rng.randint(2, 4)), "input": "", "output": " ".join(resp)})
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def make_world(root: str | Path, *, seed: int = 0) -> dict[str, Path]:
    root = Path(root)
    paths = {
        "model": build_tiny_llama(root / "init", seed=seed),
        "pref_train": write_jsonl(root / "pref_train.jsonl", planted_rows(256, seed)),
        "pref_eval": write_jsonl(root / "pref_eval.jsonl", planted_rows(64, seed + 1)),
        "sft": write_jsonl(root / "sft.jsonl", sft_rows(128, seed + 2)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": r["instruction"]} for r in sft_rows(64, seed + 3)]),
    }
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return paths


def run_cli(*args) -> None:
    """Run ``safejax <args>`` in-process and require exit code 0."""
    from safejax.cli import main

    rc = main([str(a) for a in args])
    assert rc == 0, f"safejax {' '.join(map(str, args))} exited with {rc}"


def sft_run_cut_back(run: Path, args: list[str], *, keep: int = 2, steps: int = 4) -> tuple[Path, bytes]:
    """Run ``safejax sft out_dir=run *args`` (checkpointing every step up to ``steps``), then delete the
    checkpoints after ``keep`` and the export, as if the run had been killed there.  Returns ``(run,
    metrics.jsonl bytes of the uninterrupted run)``."""
    from safejax.cli import main

    assert main(["sft", f"out_dir={run}", *args]) == 0
    full = (run / "metrics.jsonl").read_bytes()
    for s in range(keep + 1, steps + 1):
        shutil.rmtree(run / "checkpoints" / str(s))
    shutil.rmtree(run / "hf")
    return run, full
