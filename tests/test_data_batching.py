"""BatchIterator: deterministic epochs, exact resume, multi-host slices, static shapes."""

import numpy as np
import pytest

from safejax.data import BatchIterator


def _arrays(n=23):
    return {"ids": np.arange(n * 3, dtype=np.int32).reshape(n, 3), "row": np.arange(n)}


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_each_epoch_is_a_seeded_permutation_without_repeats():
    it = BatchIterator(_arrays(20), 5, seed=7, process_index=0, process_count=1)
    assert len(it) == 4
    epoch0 = np.concatenate([b["row"] for b in _take(it, 4)])
    epoch1 = np.concatenate([b["row"] for b in _take(it, 4)])
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch0, np.random.default_rng([7, 0]).permutation(20))
    again = BatchIterator(_arrays(20), 5, seed=7, process_index=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate([b["row"] for b in _take(again, 4)]), epoch0)
    other = BatchIterator(_arrays(20), 5, seed=8, process_index=0, process_count=1)
    assert not np.array_equal(np.concatenate([b["row"] for b in _take(other, 4)]), epoch0)


def test_batches_carry_matching_rows_of_every_array_with_static_shapes():
    it = BatchIterator(_arrays(23), 4, seed=0, process_index=0, process_count=1)
    assert len(it) == 5  # 23 // 4, last 3 rows dropped each epoch
    for b in _take(it, 12):
        assert b["ids"].shape == (4, 3) and b["row"].shape == (4,)
        np.testing.assert_array_equal(b["ids"][:, 0], b["row"] * 3)


def test_unshuffled_order_is_row_order():
    it = BatchIterator(_arrays(8), 4, seed=0, shuffle=False, process_index=0, process_count=1)
    assert [list(b["row"]) for b in _take(it, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


@pytest.mark.parametrize("consumed", [0, 3, 5, 6, 11])
def test_restore_reproduces_the_exact_remaining_batches(consumed):
    ref = BatchIterator(_arrays(23), 4, seed=3, process_index=0, process_count=1)
    _take(ref, consumed)
    state = ref.state()
    expected = _take(ref, 9)  # crosses at least one epoch boundary
    fresh = BatchIterator(_arrays(23), 4, seed=3, process_index=0, process_count=1).restore(dict(state))
    got = _take(fresh, 9)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["row"], g["row"])
        np.testing.assert_array_equal(e["ids"], g["ids"])
    assert fresh.state() == ref.state()


def test_state_counts_epoch_and_position():
    it = BatchIterator(_arrays(20), 5, seed=0, process_index=0, process_count=1)
    assert it.state() == {"epoch": 0, "position": 0}
    _take(it, 6)
    assert it.state() == {"epoch": 1, "position": 2}
    with pytest.raises(ValueError):
        it.restore({"epoch": 0, "position": 9})
    with pytest.raises(ValueError):
        it.restore({"epoch": 0})


def test_host_slices_are_contiguous_parts_of_the_global_batch():
    n_hosts, global_b = 4, 8
    single = BatchIterator(_arrays(23), global_b, seed=5, process_index=0, process_count=1)
    hosts = [BatchIterator(_arrays(23), global_b, seed=5, process_index=i, process_count=n_hosts)
             for i in range(n_hosts)]
    for _ in range(7):
        full = next(single)
        parts = [next(h) for h in hosts]
        for i, p in enumerate(parts):
            assert p["row"].shape == (global_b // n_hosts,)
            np.testing.assert_array_equal(p["row"], full["row"][i * 2:(i + 1) * 2])


def test_default_process_is_this_jax_process():
    it = BatchIterator(_arrays(8), 8, seed=0)
    assert (it.process_index, it.process_count, it.local_batch_size) == (0, 1, 8)


def test_keep_last_batch_fills_by_wrapping_and_marks_valid_rows():
    it = BatchIterator(_arrays(10), 4, seed=1, drop_last=False, num_epochs=1, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == 3
    assert all(b["row"].shape == (4,) and b["valid"].shape == (4,) for b in batches)
    valid_rows = np.concatenate([b["row"][b["valid"]] for b in batches])
    assert sorted(valid_rows) == list(range(10))
    assert batches[-1]["valid"].tolist() == [True, True, False, False]
    perm = np.random.default_rng([1, 0]).permutation(10)
    np.testing.assert_array_equal(batches[-1]["row"][2:], perm[:2])


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(_arrays(20), 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="leading size"):
        BatchIterator({"a": np.zeros((4, 2)), "b": np.zeros((5,))}, 2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchIterator(_arrays(3), 4, seed=0, process_index=0, process_count=1)
