"""Spending decode compute only on real tokens: the early-exit decode loop and the shared prompt prefill give the
same samples, bit for bit, as the full N-step loop and as prefilling every row (fp32, the bf16 weight-cast path,
stacked layers, and a sharded 8-device mesh), and the prefill of G samples per prompt costs 1/G of the FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safejax.generation import SamplingConfig, generate, prefill, repeat_rows
from safejax.models import CausalLM, ModelConfig
from safejax.parallel import MeshConfig, make_mesh, mesh_jit, use_mesh
from safejax.models.functional import split_model

VOCAB, PAD, EOS, P, N = 40, 0, 3, 6, 12
LENGTHS = [6, 2, 4, 1]


def _model(dtype="float32", scan_layers=False, mesh=None):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, dtype=dtype, param_dtype="float32",
                      scan_layers=scan_layers, initializer_range=0.4)
    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with use_mesh(mesh):
        return split_model(CausalLM(cfg, rngs=nnx.Rngs(0)))


def _prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), P), PAD, np.int32)
    mask = np.zeros((len(lengths), P), bool)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = rng.integers(3, VOCAB, n)
        mask[i, P - n:] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def _run(mdef, params, ids, mask, sc, eos, mesh=None):
    fn = lambda p, i, m, k: generate(mdef.merge(p), i, m, k, sc, eos_token_id=eos, pad_token_id=PAD)  # noqa: E731
    fn = mesh_jit(fn, mesh=mesh) if mesh is not None else jax.jit(fn)
    return jax.tree.map(np.asarray, fn(params, ids, mask, jax.random.key(7)))


def _with_likely_eos(mdef, params, ids, mask, sc):
    """Params whose LM-head column for EOS points along the mean hidden state, scaled until every row of a
    sampled batch ends before N while the rows still end at different steps."""
    free = _run(mdef, params, ids, mask, sc, eos=-1)
    h = jax.jit(lambda p, i, m: mdef.merge(p).hidden_states(i, m))(params, free.sequences, free.attention_mask)
    mean = np.asarray(h, np.float32).reshape(-1, h.shape[-1]).mean(0)
    for scale in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        head = np.asarray(params["lm_head"]["kernel"]).copy()
        head[:, EOS] = scale * mean / np.linalg.norm(mean)
        boosted = {**params, "lm_head": {"kernel": jnp.asarray(head)}}
        lengths = _run(mdef, boosted, ids, mask, sc, eos=EOS).response_lengths
        if lengths.max() < N - 1 and len(set(lengths.tolist())) > 1:
            return boosted
    raise AssertionError("no EOS scale ends every row early")


def _assert_same(a, b):
    for name in ("sequences", "attention_mask", "response_lengths"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("dtype,scan_layers", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_early_exit_stops_when_every_row_ended_and_is_bit_identical_to_the_full_loop(dtype, scan_layers):
    mdef, params = _model(dtype, scan_layers)
    ids, mask = _prompts()
    sc = SamplingConfig(max_new_tokens=N, temperature=1.0)
    params = _with_likely_eos(mdef, params, ids, mask, sc)
    free = _run(mdef, params, ids, mask, sc, eos=-1)          # no EOS: all N steps
    early = _run(mdef, params, ids, mask, sc, eos=EOS)
    full = _run(mdef, params, ids, mask, SamplingConfig(max_new_tokens=N, temperature=1.0, early_exit=False),
                eos=EOS)
    assert int(free.decode_steps) == N and int(full.decode_steps) == N
    _assert_same(early, full)
    # the loop ran exactly as many steps as the longest response, and that is fewer than N
    assert int(early.decode_steps) == int(early.response_lengths.max()) < N
    # the same key gives the same tokens as the run without EOS up to each row's EOS, then pad
    for b in range(len(LENGTHS)):
        n = int(early.response_lengths[b])
        np.testing.assert_array_equal(early.sequences[b, P:P + n], free.sequences[b, P:P + n])
        assert early.sequences[b, P + n - 1] == EOS and (early.sequences[b, P + n:] == PAD).all()


@pytest.mark.parametrize("dtype,scan_layers", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_shared_prefill_gives_the_samples_of_prefilling_every_repeated_row(dtype, scan_layers):
    """G = 3 samples per prompt from one prefill per prompt == generate on the prompts repeated 3 times."""
    g = 3
    mdef, params = _model(dtype, scan_layers)
    ids, mask = _prompts()
    sc = SamplingConfig(max_new_tokens=N, temperature=1.0, repetition_penalty=1.3)
    shared = _run(mdef, params, ids, mask, SamplingConfig(**{**sc.__dict__, "num_return_sequences": g}), eos=5)
    rowwise = _run(mdef, params, repeat_rows(ids, g), repeat_rows(mask, g), sc, eos=5)
    assert shared.sequences.shape == (len(LENGTHS) * g, P + N)
    _assert_same(shared, rowwise)
    # the G samples of a prompt differ (independent draws), their prompts are the same
    seq = shared.sequences.reshape(len(LENGTHS), g, P + N)
    assert (seq[:, :, :P] == seq[:, :1, :P]).all()
    assert any(not (seq[i, 0] == seq[i, 1]).all() for i in range(len(LENGTHS)))


def test_early_exit_and_shared_prefill_on_a_sharded_mesh_match_one_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    mdef, params = _model("bfloat16", mesh=mesh)
    ids, mask = _prompts([6, 2, 4, 1, 3, 5, 6, 2])
    sc = SamplingConfig(max_new_tokens=N, temperature=1.0, num_return_sequences=2)
    one = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
    ref = _run(mdef, one, repeat_rows(ids, 2), repeat_rows(mask, 2),
               SamplingConfig(max_new_tokens=N, temperature=1.0, early_exit=False), eos=7)
    out = _run(mdef, params, ids, mask, sc, eos=7, mesh=mesh)
    _assert_same(out, ref)


def test_shared_prefill_divides_the_prefill_flops_by_g():
    """XLA's cost analysis of the compiled prefill (abstract inputs): G samples per prompt cost the FLOPs of
    the prompts alone, 1/G of prefilling the repeated rows."""
    mdef, params = _model()
    g, b0 = 4, 8
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def flops(rows, sc):
        ids = jax.ShapeDtypeStruct((rows, P), jnp.int32)
        m = jax.ShapeDtypeStruct((rows, P), jnp.bool_)
        fn = jax.jit(lambda p, i, mm: prefill(mdef.merge(p), i, mm, sc, pad_token_id=PAD))
        return fn.lower(abstract, ids, m).compile().cost_analysis()["flops"]

    shared = flops(b0, SamplingConfig(max_new_tokens=N, num_return_sequences=g))
    rowwise = flops(b0 * g, SamplingConfig(max_new_tokens=N))
    assert rowwise / shared == pytest.approx(g, rel=0.02)
