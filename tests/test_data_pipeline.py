"""Tokenizer preparation and the preference / supervised / prompt-only builders, on the real
PKU-SafeRLHF sample and on small hand-made rows (SAFE_RLHF.md §2.1, §2.3, §8.18)."""

import json
import os

import numpy as np
import pytest

from safejax.data import (
    DataError,
    build_cost_pairs,
    build_prompts,
    build_reward_pairs,
    build_supervised,
    format_prompt,
    load_rows,
    load_tokenizer,
    prepare_tokenizer,
)

CORPUS = [
    "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:Mix flour, water and yeast.",
    "The quick brown fox jumps over the lazy dog. I cannot help with that request.",
    "Here is how to stay safe online: use strong passwords and keep software updated.",
]


def _sample_path_if_any():
    path = os.environ.get("SAFEJAX_PKU_SAMPLE") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "pku-saferlhf-sample", "test.jsonl")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def raw_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE with bos/eos/unk but no pad, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(CORPUS) * 20
    sample = _sample_path_if_any()
    if sample:
        with open(sample, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                texts += [format_prompt(r["prompt"], "</s>"), r["response_0"], r["response_1"]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tok(raw_tokenizer_dir):
    tokenizer, added = prepare_tokenizer(load_tokenizer(raw_tokenizer_dir))
    assert added == 1
    return tokenizer


def _ids(tok, text):
    """Independent reference tokenization: the whole text, special tokens on, no truncation."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _pku_row(i, **kw):
    row = {"prompt": f"question number {i}?", "response_0": f"first answer {i}", "response_1": f"second reply {i}",
           "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0,
           "safer_response_id": 0}
    row.update(kw)
    return row


# ----------------------------------------------------------------------------- tokenizer


def test_prepare_tokenizer_adds_a_pad_distinct_from_eos(raw_tokenizer_dir):
    raw = load_tokenizer(raw_tokenizer_dir)
    assert raw.pad_token is None
    n = len(raw)
    tok, added = prepare_tokenizer(raw)
    assert added == 1 and len(tok) == n + 1
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n
    assert tok.pad_token_id != tok.eos_token_id
    assert prepare_tokenizer(tok)[1] == 0


def test_prepare_tokenizer_replaces_a_pad_equal_to_eos(raw_tokenizer_dir):
    raw = load_tokenizer(raw_tokenizer_dir)
    raw.pad_token = raw.eos_token
    tok, added = prepare_tokenizer(raw)
    assert added == 1 and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_builders_refuse_an_unprepared_tokenizer(raw_tokenizer_dir):
    raw = load_tokenizer(raw_tokenizer_dir)
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        build_reward_pairs([_pku_row(0)], raw, max_length=32)


# ----------------------------------------------------------------------------- real sample


def test_real_sample_pair_counts_and_drops_match_independent_count(pku_sample_path, tok):
    """The 186 real rows through load_rows(path); expected counts computed from the raw JSON."""
    with open(pku_sample_path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 186
    rows = load_rows(pku_sample_path)
    eos = tok.eos_token
    max_length = 128  # short enough that some pairs become identical after truncation

    # independent reference: tokenize whole texts, cut at max_length, compare
    def seqs(r, first_id):
        p = format_prompt(r["prompt"], eos)
        a, b = (r["response_0"], r["response_1"]) if first_id == 0 else (r["response_1"], r["response_0"])
        return _ids(tok, p + a + eos)[:max_length], _ids(tok, p + b + eos)[:max_length]

    reward_identical = [i for i, r in enumerate(raw) if len(set(map(tuple, seqs(r, r["better_response_id"])))) == 1]
    conflicts = [i for i, r in enumerate(raw)
                 if not r[f"is_response_{r['safer_response_id']}_safe"]
                 and r[f"is_response_{1 - r['safer_response_id']}_safe"]]
    assert conflicts == []  # README: when exactly one response is safe, safer_response_id points to it
    cost_identical = [i for i, r in enumerate(raw) if len(set(map(tuple, seqs(r, r["safer_response_id"])))) == 1]
    assert 0 < len(reward_identical) < 186 and 0 < len(cost_identical) < 186

    pairs, report = build_reward_pairs(rows, tok, max_length=max_length)
    assert report.total == 186
    assert report.dropped == {"identical_after_truncation": len(reward_identical)}
    assert report.kept == len(pairs) == 186 - len(reward_identical)
    assert pairs.better_ids.shape == (len(pairs), max_length) and pairs.better_ids.dtype == np.int32
    assert pairs.better_mask.dtype == bool
    kept = [i for i in range(186) if i not in set(reward_identical)]
    np.testing.assert_array_equal(pairs.row_index, kept)
    for j, i in enumerate(kept):
        better, worse = seqs(raw[i], raw[i]["better_response_id"])
        assert pairs.better_ids[j, :len(better)].tolist() == better and pairs.better_mask[j].sum() == len(better)
        assert pairs.worse_ids[j, :len(worse)].tolist() == worse and pairs.worse_mask[j].sum() == len(worse)
        assert (pairs.better_ids[j, len(better):] == tok.pad_token_id).all()

    cost, creport = build_cost_pairs(rows, tok, max_length=max_length)
    assert creport.total == 186
    assert creport.dropped == {"identical_after_truncation": len(cost_identical)}
    assert creport.kept == len(cost) == 186 - len(cost_identical)
    ckept = [i for i in range(186) if i not in set(cost_identical)]
    np.testing.assert_array_equal(cost.row_index, ckept)
    want_safer = [raw[i][f"is_response_{raw[i]['safer_response_id']}_safe"] for i in ckept]
    want_unsafer = [raw[i][f"is_response_{1 - raw[i]['safer_response_id']}_safe"] for i in ckept]
    assert cost.safer_is_safe.tolist() == want_safer and cost.unsafer_is_safe.tolist() == want_unsafer
    for j, i in enumerate(ckept):
        safer, unsafer = seqs(raw[i], raw[i]["safer_response_id"])
        assert cost.safer_ids[j, :len(safer)].tolist() == safer
        assert cost.unsafer_ids[j, :len(unsafer)].tolist() == unsafer
    assert "identical_after_truncation" in str(creport) and "186" in str(creport)


def test_real_sample_full_length_keeps_every_pair_and_ends_on_eos(pku_sample_path, tok):
    rows = load_rows(pku_sample_path)
    max_length = 1024
    pairs, report = build_reward_pairs(rows, tok, max_length=max_length)
    assert report.kept == 186 and report.dropped == {}
    lengths = pairs.better_mask.sum(1)
    fits = lengths < max_length
    assert fits.any()
    last = pairs.better_ids[np.arange(len(pairs)), lengths - 1]
    assert (last[fits] == tok.eos_token_id).all()


def test_real_sample_prompts_dedupe_keeps_last_copy(pku_sample_path, tok):
    rows = load_rows([pku_sample_path, pku_sample_path])  # every prompt twice
    prompts, report = build_prompts(rows, tok, prompt_width=512)
    assert report.total == 372 and report.dropped == {"duplicate_prompt": 186} and report.kept == 186
    np.testing.assert_array_equal(prompts.row_index, np.arange(186, 372))


# ----------------------------------------------------------------------------- preference details


def test_reward_pairs_follow_better_response_id(tok):
    rows = [_pku_row(0, better_response_id=0), _pku_row(1, better_response_id=1)]
    pairs, report = build_reward_pairs(rows, tok, max_length=64)
    assert report.kept == 2
    eos = tok.eos_token
    for j, r in enumerate(rows):
        b, w = ("response_0", "response_1") if r["better_response_id"] == 0 else ("response_1", "response_0")
        want_b = _ids(tok, format_prompt(r["prompt"], eos) + r[b] + eos)
        want_w = _ids(tok, format_prompt(r["prompt"], eos) + r[w] + eos)
        assert pairs.better_ids[j][pairs.better_mask[j]].tolist() == want_b
        assert pairs.worse_ids[j][pairs.worse_mask[j]].tolist() == want_w
    text = tok.decode(pairs.better_ids[1][pairs.better_mask[1]].tolist())
    assert text == "<s>BEGINNING OF CONVERSATION: USER: question number 1? ASSISTANT:second reply 1</s>"


def test_cost_pairs_swap_texts_and_safety_labels_together(tok):
    rows = [
        _pku_row(0, is_response_0_safe=True, is_response_1_safe=False, safer_response_id=0),
        _pku_row(1, is_response_0_safe=False, is_response_1_safe=True, safer_response_id=1),
        _pku_row(2, is_response_0_safe=False, is_response_1_safe=False, safer_response_id=1),
        _pku_row(3, is_response_0_safe=True, is_response_1_safe=True, safer_response_id=1),
    ]
    cost, report = build_cost_pairs(rows, tok, max_length=64)
    assert report.kept == 4
    assert cost.safer_is_safe.tolist() == [True, True, False, True]
    assert cost.unsafer_is_safe.tolist() == [False, False, False, True]
    eos = tok.eos_token
    for j, r in enumerate(rows):
        s = f"response_{r['safer_response_id']}"
        u = f"response_{1 - r['safer_response_id']}"
        assert cost.safer_ids[j][cost.safer_mask[j]].tolist() == _ids(tok, format_prompt(r["prompt"], eos) + r[s] + eos)
        assert cost.unsafer_ids[j][cost.unsafer_mask[j]].tolist() == _ids(
            tok, format_prompt(r["prompt"], eos) + r[u] + eos)


def test_conflicting_safety_labels_are_dropped_and_counted(tok):
    rows = [_pku_row(0),
            _pku_row(1, is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0),  # conflict
            _pku_row(2, is_response_0_safe=True, is_response_1_safe=False, safer_response_id=1)]  # conflict
    cost, report = build_cost_pairs(rows, tok, max_length=64)
    assert report.dropped == {"conflicting_safety_labels": 2} and report.kept == 1
    assert cost.row_index.tolist() == [0]
    reward, rreport = build_reward_pairs(rows, tok, max_length=64)  # helpfulness pairs are unaffected
    assert rreport.kept == 3


def test_eos_appended_and_lost_when_truncated(tok):
    short = _pku_row(0)
    long_ = _pku_row(1, response_0="word " * 200, response_1="other " * 200)
    prompt_len = len(_ids(tok, format_prompt(long_["prompt"], tok.eos_token)))
    pairs, report = build_reward_pairs([short, long_], tok, max_length=prompt_len + 20)
    assert report.kept == 2
    n0 = pairs.better_mask[0].sum()
    assert pairs.better_ids[0, n0 - 1] == tok.eos_token_id
    assert pairs.better_mask[1].all()
    assert tok.eos_token_id not in pairs.better_ids[1].tolist()
    assert pairs.better_ids[0, 0] == tok.bos_token_id


def test_pairs_identical_after_truncation_are_dropped(tok):
    same_start = _pku_row(0, response_0="shared beginning " * 30 + "A", response_1="shared beginning " * 30 + "B")
    rows = [same_start, _pku_row(1)]
    pairs, report = build_reward_pairs(rows, tok, max_length=48)
    assert report.dropped == {"identical_after_truncation": 1} and report.kept == 1
    assert pairs.row_index.tolist() == [1]
    pairs, report = build_reward_pairs(rows, tok, max_length=512)
    assert report.dropped == {} and report.kept == 2


BAD_ROWS = [
    ("missing field", lambda r: r.pop("response_1"), "response_1"),
    ("prompt not a string", lambda r: r.update(prompt=123), "prompt"),
    ("empty prompt", lambda r: r.update(prompt="   "), "prompt"),
    ("better id not 0/1", lambda r: r.update(better_response_id=2), "better_response_id"),
    ("safer id not 0/1", lambda r: r.update(safer_response_id=-1), "safer_response_id"),
    ("is_safe not bool", lambda r: r.update(is_response_0_safe="yes"), "is_response_0_safe"),
]


@pytest.mark.parametrize("what,mutate,field", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_raise_data_error_naming_file_row_and_field(tmp_path, tok, what, mutate, field):
    rows = [_pku_row(i) for i in range(5)]
    mutate(rows[3])
    path = _write_jsonl(tmp_path / "bad_rows.jsonl", rows)
    ds = load_rows(path)
    builder = build_reward_pairs if field != "safer_response_id" and not field.startswith("is_") else build_cost_pairs
    with pytest.raises(DataError) as err:
        builder(ds, tok, max_length=64)
    msg = str(err.value)
    assert "bad_rows.jsonl" in msg and "row 3" in msg and repr(field) in msg
    arrays, report = builder(ds, tok, max_length=64, skip_bad_rows=True)
    assert report.dropped == {f"bad_row:{field}": 1} and report.kept == 4 and len(arrays) == 4
    assert 3 not in arrays.row_index.tolist()


def test_bad_row_after_mixing_names_its_own_file_and_row(tmp_path, tok):
    good = _write_jsonl(tmp_path / "good.jsonl", [_pku_row(i) for i in range(4)])
    bad_rows = [_pku_row(i) for i in range(3)]
    bad_rows[1]["prompt"] = ""
    bad = _write_jsonl(tmp_path / "other.jsonl", bad_rows)
    ds = load_rows([good, bad])
    with pytest.raises(DataError, match=r"other\.jsonl, row 1, field 'prompt'"):
        build_reward_pairs(ds, tok, max_length=64)


# ----------------------------------------------------------------------------- supervised


def test_supervised_labels_cover_response_and_eos_only(tok):
    rows = [{"instruction": "Name a colour", "input": "", "output": "Blue"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"prompt": "question number 3?", "response": "first answer 3"},
            {"prompt": "question number 4?", "answer": "second reply 4"}]
    sft, report = build_supervised(rows, tok, max_length=64)
    assert report.kept == 4
    eos = tok.eos_token
    cases = [("Name a colour", "Blue"), ("Translate bonjour", "hello"),
             ("question number 3?", "first answer 3"), ("question number 4?", "second reply 4")]
    for j, (user, answer) in enumerate(cases):
        prompt = format_prompt(user, eos)
        full = _ids(tok, prompt + answer + eos)
        n_prompt = len(_ids(tok, prompt))
        assert sft.input_ids[j][sft.attention_mask[j]].tolist() == full
        want = np.zeros(64, bool)
        want[n_prompt:len(full)] = True
        np.testing.assert_array_equal(sft.label_mask[j], want)
        assert not sft.label_mask[j, 0]  # BOS is masked out
        assert tok.decode(sft.input_ids[j][sft.label_mask[j]].tolist()) == answer + eos
        assert sft.labels()[j, 0] == -100
    assert sft.input_ids.dtype == np.int32 and sft.label_mask.dtype == bool


def test_supervised_truncation_and_prompt_too_long(tok):
    long_answer = {"instruction": "Say hello", "output": "hello " * 100}
    long_prompt = {"instruction": "word " * 100, "output": "ok"}
    prompt_len = len(_ids(tok, format_prompt("Say hello", tok.eos_token)))
    sft, report = build_supervised([long_answer, long_prompt], tok, max_length=prompt_len + 5)
    assert report.dropped == {"prompt_too_long": 1} and report.kept == 1
    assert sft.attention_mask[0].all() and sft.label_mask[0].sum() == 5
    assert tok.eos_token_id not in sft.input_ids[0].tolist()


def test_supervised_bad_row_names_field(tok):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "ok", "output": 5}]
    with pytest.raises(DataError, match=r"row 1, field 'output'"):
        build_supervised(rows, tok, max_length=32, source_name="sft.jsonl")
    _, report = build_supervised(rows, tok, max_length=32, skip_bad_rows=True)
    assert report.dropped == {"bad_row:output": 1}


# ----------------------------------------------------------------------------- prompts


def test_prompt_dedupe_keeps_last_occurrence_in_index_order(tok):
    rows = [{"prompt": p} for p in ["a?", "b?", "a?", "c?", "b?"]]
    prompts, report = build_prompts(rows, tok, prompt_width=32)
    assert prompts.row_index.tolist() == [2, 3, 4]
    assert report.dropped == {"duplicate_prompt": 2} and report.kept == 3


def test_left_padding_puts_every_prompt_last_token_at_final_column(tok):
    rows = [{"prompt": "hi"}, {"prompt": "a much longer question about bread and yeast?"},
            {"prompt": ["q1", "a1", "q2"]}, {"instruction": "Translate", "input": "bonjour"}]
    width = 48
    prompts, report = build_prompts(rows, tok, prompt_width=width)
    assert report.kept == 4 and prompts.prompt_ids.shape == (4, width)
    eos = tok.eos_token
    users = ["hi", "a much longer question about bread and yeast?", ["q1", "a1", "q2"], "Translate bonjour"]
    for j, user in enumerate(users):
        want = _ids(tok, format_prompt(user, eos))
        n = len(want)
        assert prompts.prompt_ids[j, width - n:].tolist() == want
        assert prompts.prompt_mask[j].tolist() == [False] * (width - n) + [True] * n
        assert (prompts.prompt_ids[j, :width - n] == tok.pad_token_id).all()
        assert tok.convert_ids_to_tokens(int(prompts.prompt_ids[j, -1])) == ":"  # ...ASSISTANT:
    assert prompts.prompt_mask[:, -1].all()


def test_prompts_longer_than_width_are_dropped_or_rejected(tok):
    rows = [{"prompt": "short?"}, {"prompt": "long " * 50}]
    prompts, report = build_prompts(rows, tok, prompt_width=24)
    assert report.dropped == {"prompt_too_long": 1} and prompts.row_index.tolist() == [0]
    with pytest.raises(DataError, match=r"row 1, field 'prompt'.*prompt_width=24"):
        build_prompts(rows, tok, prompt_width=24, drop_too_long=False, source_name="rl.jsonl")
    with pytest.raises(DataError, match=r"row 0, field 'prompt': empty"):
        build_prompts([{"prompt": ""}], tok, prompt_width=24)
