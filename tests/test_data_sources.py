"""Dataset specs, local loading through `datasets`, and proportion mixing (SAFE_RLHF.md §2.1)."""

import json
from collections import Counter

import numpy as np
import pytest

from safejax.data import DataError, DatasetSpec, load_rows, parse_dataset_spec, sample_indices


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _rows(n, tag, extra=None):
    return [{"prompt": f"{tag} prompt {i}", "response_0": f"a{i}", "response_1": f"b{i}",
             "better_response_id": i % 2, **(extra or {})} for i in range(n)]


@pytest.mark.parametrize("spec,expected", [
    ("PKU-SafeRLHF/train", DatasetSpec("PKU-SafeRLHF/train", 1.0, None, None)),
    ("alpaca:0.5", DatasetSpec("alpaca", 0.5, None, None)),
    ("alpaca:2.5", DatasetSpec("alpaca", 2.5, None, None)),
    ("alpaca:1/4", DatasetSpec("alpaca", 0.25, None, None)),
    ("alpaca:300/-1", DatasetSpec("alpaca", None, 300, None)),
    ("PKU-SafeRLHF/test::/data/pku", DatasetSpec("PKU-SafeRLHF/test", 1.0, None, "/data/pku")),
    ("PKU-SafeRLHF-10K/train:0.1:/data/x.jsonl", DatasetSpec("PKU-SafeRLHF-10K/train", 0.1, None, "/data/x.jsonl")),
])
def test_spec_strings_parse_into_name_proportion_and_path(spec, expected):
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("spec", ["alpaca:abc", "alpaca:-0.5", "alpaca:nan", "alpaca:1:", ":0.5", "alpaca:1/0"])
def test_malformed_spec_strings_are_rejected(spec):
    with pytest.raises(ValueError):
        parse_dataset_spec(spec)


def test_sampling_repeats_whole_copies_then_a_seeded_subset():
    idx = sample_indices(10, proportion=2.5, rng=np.random.default_rng(0))
    counts = Counter(idx.tolist())
    assert len(idx) == 25 and set(counts) == set(range(10))
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    np.testing.assert_array_equal(idx[:20], np.tile(np.arange(10), 2))
    np.testing.assert_array_equal(idx, sample_indices(10, proportion=2.5, rng=np.random.default_rng(0)))
    exact = sample_indices(10, num_samples=13, rng=np.random.default_rng(1))
    assert len(exact) == 13 and len(set(exact[10:].tolist())) == 3
    assert len(sample_indices(10, proportion=0.0, rng=np.random.default_rng(0))) == 0


def test_local_jsonl_loads_with_provenance_columns(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", _rows(5, "a"))
    ds = load_rows(path)
    assert len(ds) == 5
    assert ds["prompt"][:] == [f"a prompt {i}" for i in range(5)]
    assert set(ds["_source"][:]) == {path}
    assert ds["_row"][:] == list(range(5))


def test_mixing_proportions_gives_expected_sizes_and_is_seeded(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _rows(10, "a"))
    b = _write_jsonl(tmp_path / "b.jsonl", _rows(7, "b"))
    specs = [f"{a}:0.5", f"{b}:2", f"{a}:3/-1"]
    ds = load_rows(specs)
    assert len(ds) == 5 + 14 + 3
    sources, rows = ds["_source"][:], ds["_row"][:]
    assert Counter(sources) == {a: 8, b: 14}
    assert Counter(r for s, r in zip(sources, rows) if s == b) == {i: 2 for i in range(7)}
    again = load_rows(specs)
    assert again["_row"][:] == rows
    first_part = [r for r in rows[:5]]
    expected = np.sort(np.random.default_rng([42, 0]).permutation(10)[:5]).tolist()
    assert first_part == expected
    other_seed = load_rows(specs, seed=0)
    assert other_seed["_row"][:] != rows


def test_mixing_keeps_only_the_common_columns(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _rows(3, "a", {"extra": 1}))
    b = _write_jsonl(tmp_path / "b.jsonl", _rows(2, "b"))
    ds = load_rows([a, b])
    assert len(ds) == 5
    assert "extra" not in ds.column_names and "better_response_id" in ds.column_names


def test_folder_split_files_and_registered_name_with_local_path(tmp_path):
    folder = tmp_path / "pku"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _rows(6, "train"))
    _write_jsonl(folder / "test.jsonl", _rows(4, "test"))
    assert len(load_rows(str(folder), split="test")) == 4
    assert len(load_rows(str(folder), split="train")) == 6
    ds = load_rows(f"PKU-SafeRLHF/test:0.5:{folder}")
    assert len(ds) == 2 and all(p.startswith("test") for p in ds["prompt"][:])
    with pytest.raises(ValueError, match="split"):
        load_rows(str(folder), split="validation")


def test_parquet_file_loads(tmp_path):
    import datasets

    path = str(tmp_path / "x.parquet")
    datasets.Dataset.from_list(_rows(4, "p")).to_parquet(path)
    ds = load_rows(f"{path}:0.5")
    assert len(ds) == 2 and ds.column_names[:2] == ["prompt", "response_0"]


def test_unknown_name_and_offline_hub_name_give_clear_errors():
    with pytest.raises(ValueError, match="not a registered name"):
        load_rows("no/such/dataset")
    with pytest.raises(ValueError, match="local path"):
        load_rows("PKU-SafeRLHF/train")  # tests run offline: explains how to point at a local copy


def test_unreadable_file_raises_data_error_naming_it(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match="broken.jsonl"):
        load_rows(str(path))


def test_saved_dataset_dict_folder_loads_the_requested_split(tmp_path):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(5, "tr")),
                          "test": datasets.Dataset.from_list(_rows(3, "te"))}).save_to_disk(folder)
    ds = load_rows(f"PKU-SafeRLHF/test:1:{folder}")
    assert ds["prompt"][:] == [f"te prompt {i}" for i in range(3)]
    assert len(load_rows(folder)) == 5
