#!/usr/bin/env python3
"""packing_fraction.py - useful-token fraction (real tokens / computed tokens) of SFT, RM and CM batches on a
PKU-SafeRLHF file, padded (one example per row) against packed (``data.pack: true``).

No Llama tokenizer is available offline here, so the script trains a byte-level BPE (``--vocab``, default 2500:
about 4.1 characters per token on the sample) on the file's own prompts and responses and prints its characters
per token (a Llama tokenizer gives about 4 on English).  SFT rows are ``prompt + response_0`` and
``prompt + response_1``; RM and CM rows are the pairs of ``safejax.data.build_reward_pairs`` /
``build_cost_pairs``.  Padded rows are ``max_length`` wide (a pair: two
rows); packed SFT rows are ``max_length`` wide, packed pairs ``2 x max_length``.

Usage:
    python experiments/bench/packing_fraction.py PATH/test.jsonl [--max-length 512 1024]
    (PATH defaults to $SAFEJAX_PKU_SAMPLE)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402

from safejax.data import build_cost_pairs, build_reward_pairs, build_supervised, load_tokenizer  # noqa: E402
from safejax.data import prepare_tokenizer  # noqa: E402
from safejax.data.packing import pack_pairs, pack_supervised, useful_token_fraction  # noqa: E402
from safejax.data.template import format_prompt  # noqa: E402


def train_tokenizer(rows: list[dict], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for r in rows for t in (format_prompt(r["prompt"], "</s>"), r["response_0"], r["response_1"])]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tempfile.mkdtemp(prefix="safejax-bpe-")
    fast.save_pretrained(folder)
    tok, _ = prepare_tokenizer(load_tokenizer(folder))
    chars = sum(len(t) for t in texts)
    tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    return tok, chars / tokens


def fractions(rows: list[dict], tok, max_length: int) -> dict:
    sft_rows = [{"prompt": r["prompt"], "response": r[f"response_{i}"]} for r in rows for i in (0, 1)]
    sft, _ = build_supervised(sft_rows, tok, max_length=max_length)
    packed = pack_supervised(sft)
    out = {"sft": (len(sft), useful_token_fraction(sft.attention_mask), len(packed["input_ids"]),
                   useful_token_fraction(packed["attention_mask"]))}
    for kind, build, (a, b), labels in (
            ("rm", build_reward_pairs, ("better", "worse"), ()),
            ("cm", build_cost_pairs, ("safer", "unsafer"), ("safer_is_safe", "unsafer_is_safe"))):
        pairs, _ = build(rows, tok, max_length=max_length)
        d = pairs.as_dict()
        d.update({k: getattr(pairs, k) for k in labels})
        p = pack_pairs(d, a, b, labels)
        padded = np.concatenate([d[f"{a}_mask"], d[f"{b}_mask"]])
        out[kind] = (len(d[f"{a}_mask"]), useful_token_fraction(padded), len(p["input_ids"]),
                     useful_token_fraction(p["attention_mask"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", nargs="?", default=os.environ.get("SAFEJAX_PKU_SAMPLE"))
    ap.add_argument("--max-length", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--vocab", type=int, default=2500)
    args = ap.parse_args(argv)
    if not args.path:
        print("packing_fraction.py: give the PKU-SafeRLHF jsonl path (or set SAFEJAX_PKU_SAMPLE)", file=sys.stderr)
        return 2
    with open(args.path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok, cpt = train_tokenizer(rows, args.vocab)
    print(f"{len(rows)} rows of {args.path}; byte-level BPE with {len(tok)} tokens, {cpt:.2f} characters per token")
    print("| data | max_length | examples | padded rows | useful (padded) | packed rows | useful (packed) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for L in args.max_length:
        for kind, (n, fp, r, fk) in fractions(rows, tok, L).items():
            padded_rows = n if kind == "sft" else 2 * n
            print(f"| {kind} | {L} | {n} | {padded_rows} x {L} | {100 * fp:.1f} % | "
                  f"{r} x {L if kind == 'sft' else 2 * L} | {100 * fk:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
