"""The jitted sampler (safejax.generation) against transformers: greedy ``generate`` token for token on a
left-padded batch (with early EOS and with the repetition penalty), the logits processors against HF's
warpers, and the sampling contract (fixed key reproducible, EOS then pad, top-k 1 = greedy, frequencies
follow the processed distribution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_reference
from safejax.generation import SamplingConfig, generate, process_logits
from safejax.models import load_pretrained

VOCAB = 50
PAD = 0
P = 7            # prompt width
N = 10           # new tokens
LENGTHS = [7, 3, 5, 1, 6, 2]   # real prompt lengths in one left-padded batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch LlamaForCausalLM in eval mode, our CausalLM loaded from its HF folder, prompt ids, prompt mask)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                   max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("gen-llama")
    hf.save_pretrained(folder)
    lm = load_pretrained(folder)
    ids, mask = hf_reference.left_padded_prompts(LENGTHS, P, VOCAB, PAD)
    return hf, lm, ids, mask


def _hf_generate(hf, ids, mask, *, eos, repetition_penalty=1.0):
    return hf_reference.hf_greedy_generate(hf, ids, mask, new_tokens=N, pad=PAD, eos=eos, bos=1,
                                           repetition_penalty=repetition_penalty)


_JITTED = {}


def _ours(lm, ids, mask, cfg, *, eos, key=None):
    """Our generate, jitted once per (config, eos)."""
    k = (cfg, eos)
    if k not in _JITTED:
        _JITTED[k] = jax.jit(lambda i, m, key: generate(lm, i, m, key, cfg, eos_token_id=eos, pad_token_id=PAD))
    out = _JITTED[k](jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0) if key is None else key)
    return jax.tree.map(np.asarray, out)


def _pick_eos(rows: np.ndarray) -> int:
    """A token generated mid-way in some rows but not in all, so that some rows stop early and others do not."""
    resp = rows[:, P:]
    best, best_score = None, -1
    for tok in range(3, VOCAB):
        hit = (resp[:, :-2] == tok).any(axis=1)
        score = int(hit.sum()) if 0 < hit.sum() < len(rows) else -1
        if score > best_score:
            best, best_score = tok, score
    assert best is not None and best_score > 0
    return best


def _check_after_eos(seq: np.ndarray, attn: np.ndarray, lengths: np.ndarray, eos: int) -> None:
    for b in range(seq.shape[0]):
        resp, m = seq[b, P:], attn[b, P:]
        hits = np.flatnonzero(resp == eos)
        n_real = hits[0] + 1 if hits.size else N
        assert lengths[b] == n_real
        assert m[:n_real].all() and not m[n_real:].any()
        assert (resp[n_real:] == PAD).all()


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate_token_for_token(tiny, repetition_penalty):
    hf, lm, ids, mask = tiny
    # choose an EOS from an HF run without one, so that some rows stop early and some run to the end
    free = _hf_generate(hf, ids, mask, eos=VOCAB + 7, repetition_penalty=repetition_penalty)
    eos = _pick_eos(free)
    ref = _hf_generate(hf, ids, mask, eos=eos, repetition_penalty=repetition_penalty)
    stopped = (ref[:, P:] == eos).any(axis=1)
    assert stopped.any() and not stopped.all()
    cfg = SamplingConfig(max_new_tokens=N, greedy=True, repetition_penalty=repetition_penalty)
    out = _ours(lm, ids, mask, cfg, eos=eos)
    np.testing.assert_array_equal(out.sequences, ref)
    np.testing.assert_array_equal(out.attention_mask[:, :P], mask)
    _check_after_eos(out.sequences, out.attention_mask, out.response_lengths, eos)


def test_repetition_penalty_changes_greedy_output(tiny):
    # guards the test above against a penalty that silently does nothing
    hf, lm, ids, mask = tiny
    plain = _ours(lm, ids, mask, SamplingConfig(max_new_tokens=N, greedy=True), eos=VOCAB + 7).sequences
    pen = _ours(lm, ids, mask, SamplingConfig(max_new_tokens=N, greedy=True, repetition_penalty=1.3),
                eos=VOCAB + 7).sequences
    assert (plain != pen).any()


def test_sampling_is_reproducible_and_key_dependent(tiny):
    _, lm, ids, mask = tiny
    cfg = SamplingConfig(max_new_tokens=N, temperature=1.0)
    a = _ours(lm, ids, mask, cfg, eos=VOCAB + 7, key=jax.random.key(11)).sequences
    b = _ours(lm, ids, mask, cfg, eos=VOCAB + 7, key=jax.random.key(11)).sequences
    c = _ours(lm, ids, mask, cfg, eos=VOCAB + 7, key=jax.random.key(12)).sequences
    np.testing.assert_array_equal(a, b)
    assert (a[:, P:] != c[:, P:]).mean() > 0.3
    np.testing.assert_array_equal(a[:, :P], ids)
    # every step draws fresh noise: at a temperature where the distribution is nearly uniform over 50 tokens,
    # consecutive tokens almost never repeat (re-using one key per row would repeat them almost always)
    hot = _ours(lm, ids, mask, SamplingConfig(max_new_tokens=N, temperature=1e3), eos=VOCAB + 7,
                key=jax.random.key(11)).sequences[:, P:]
    assert (hot[:, 1:] == hot[:, :-1]).mean() < 0.2
    assert len(np.unique(hot)) > 25


def test_sampling_stops_at_eos_and_pads_after_it(tiny):
    _, lm, ids, mask = tiny
    cfg = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.95)
    key = jax.random.key(5)
    free = _ours(lm, ids, mask, cfg, eos=VOCAB + 7, key=key)
    eos = _pick_eos(free.sequences)
    out = _ours(lm, ids, mask, cfg, eos=eos, key=key)
    _check_after_eos(out.sequences, out.attention_mask, out.response_lengths, eos)
    assert (out.response_lengths < N).any() and (out.response_lengths == N).any()
    # same key: identical draws up to (and including) each row's EOS
    for b in range(len(LENGTHS)):
        n = out.response_lengths[b]
        np.testing.assert_array_equal(out.sequences[b, :P + n], free.sequences[b, :P + n])


def test_top_k_one_sampling_equals_greedy(tiny):
    _, lm, ids, mask = tiny
    greedy = _ours(lm, ids, mask, SamplingConfig(max_new_tokens=N, greedy=True), eos=VOCAB + 7).sequences
    for seed in (0, 1):
        topk1 = _ours(lm, ids, mask, SamplingConfig(max_new_tokens=N, top_k=1, temperature=0.7), eos=VOCAB + 7,
                      key=jax.random.key(seed)).sequences
        np.testing.assert_array_equal(topk1, greedy)


def test_sampled_token_frequencies_follow_processed_distribution(tiny):
    """Draw two response tokens 8192 times for one prompt.  The first token's frequencies must match
    softmax(process_logits(...)); the second token's, among the rows whose first token was the most common one,
    must match the processed distribution after that token (fresh randomness at every step)."""
    _, lm, ids, mask = tiny
    cfg = SamplingConfig(max_new_tokens=2, temperature=1.5, top_k=12, top_p=0.9, repetition_penalty=1.2)
    reps = 8192
    row = 0
    big_ids, big_mask = np.repeat(ids[row:row + 1], reps, 0), np.repeat(mask[row:row + 1], reps, 0)
    out = _ours(lm, big_ids, big_mask, cfg, eos=VOCAB + 7, key=jax.random.key(3))

    def processed(prefix: np.ndarray) -> np.ndarray:
        x = jnp.asarray(prefix[None])
        logits = lm(x, attention_mask=jnp.ones_like(x), positions=jnp.arange(x.shape[1])[None])[:, -1]
        seen = np.zeros((1, VOCAB), bool)
        seen[0, ids[row]] = True          # HF semantics: the penalty covers the whole (left-padded) input
        seen[0, prefix] = True
        return np.asarray(jax.nn.softmax(process_logits(logits, jnp.asarray(seen), cfg), axis=-1))[0]

    prompt = ids[row][mask[row]]
    first = out.sequences[:, P]
    p1 = processed(prompt)
    f1 = np.bincount(first, minlength=VOCAB) / reps
    assert 1 < (p1 > 0).sum() <= 12 and f1[p1 == 0].sum() == 0
    np.testing.assert_allclose(f1, p1, atol=5 * np.sqrt(0.25 / reps))   # 5 sigma of a binomial frequency
    a = int(np.argmax(f1))
    sel = first == a
    p2 = processed(np.append(prompt, a))
    f2 = np.bincount(out.sequences[sel, P + 1], minlength=VOCAB) / sel.sum()
    assert 1 < (p2 > 0).sum() and f2[p2 == 0].sum() == 0
    np.testing.assert_allclose(f2, p2, atol=5 * np.sqrt(0.25 / sel.sum()))


def _surviving_hf(scores: np.ndarray, ids: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(transformers.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.temperature != 1.0:
        procs.append(transformers.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(transformers.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(transformers.TopPLogitsWarper(cfg.top_p))
    s = torch.tensor(scores)
    input_ids = torch.tensor(ids, dtype=torch.long)
    for p in procs:
        s = p(input_ids, s)
    return s.numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(top_p=0.8),
    SamplingConfig(top_p=0.3, temperature=0.7),
    SamplingConfig(top_k=5),
    SamplingConfig(top_k=20, top_p=0.6, temperature=1.3),
    SamplingConfig(repetition_penalty=1.5),
    SamplingConfig(repetition_penalty=1.2, top_p=0.5, top_k=10, temperature=0.8),
], ids=["top_p", "top_p_temp", "top_k", "top_k_top_p_temp", "rep_penalty", "all"])
def test_process_logits_matches_hf_warpers(cfg):
    rng = np.random.default_rng(0)
    b, v = 64, 40
    scores = (rng.standard_normal((b, v)) * 2.5).astype(np.float32)
    prev = rng.integers(0, v, size=(b, 12))
    seen = np.zeros((b, v), bool)
    np.put_along_axis(seen, prev, True, axis=1)
    ours = np.asarray(process_logits(jnp.asarray(scores), jnp.asarray(seen), cfg))
    ref = _surviving_hf(scores, prev, cfg)
    ours_keep = ours > np.finfo(np.float32).min
    ref_keep = np.isfinite(ref)
    np.testing.assert_array_equal(ours_keep, ref_keep)
    if cfg.top_p < 1.0 or cfg.top_k:
        assert (ref_keep.sum(1) < v).all()  # truncation actually happened
    np.testing.assert_allclose(ours[ours_keep], ref[ref_keep], rtol=1e-6, atol=1e-6)


def test_sampling_config_rejects_bad_values():
    from safejax.config import ConfigError

    for bad in (SamplingConfig(top_p=0.0), SamplingConfig(temperature=0.0), SamplingConfig(max_new_tokens=0),
                SamplingConfig(top_k=-1), SamplingConfig(repetition_penalty=0.0)):
        with pytest.raises((ConfigError, ValueError)):
            bad.validate()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cast_matmul_weights_is_exact_and_halves_what_the_decode_loop_reads(scan_layers):
    """fp32 master weights + bf16 compute: ``cast_matmul_weights`` stores every kernel/embedding in bf16 (norm
    scales stay fp32), the forward logits are bit-identical, sampling with ``cast_weights`` on or off gives the
    same tokens, and the decode ``while`` loop then carries no fp32 weight matrix (2 bytes read per weight)."""
    import re

    from flax import nnx

    from safejax.generation import cast_matmul_weights
    from safejax.models import CausalLM, ModelConfig
    from safejax.parallel import MeshConfig, make_mesh, use_mesh
    from safejax.models.functional import split_model

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, dtype="bfloat16", param_dtype="float32",
                      scan_layers=scan_layers, initializer_range=0.3)
    with use_mesh(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])):
        mdef, params = split_model(CausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (4, P)), jnp.int32)
    mask = jnp.ones_like(ids)

    dtypes = jax.eval_shape(
        lambda p: nnx.to_pure_dict(nnx.state(cast_matmul_weights(mdef.merge(p)), nnx.Param)), params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
            for path, x in jax.tree_util.tree_leaves_with_path(dtypes)}
    assert {v for k, v in flat.items() if k.endswith(("kernel", "embedding"))} == {jnp.dtype(jnp.bfloat16)}
    assert {v for k, v in flat.items() if k.endswith("weight")} == {jnp.dtype(jnp.float32)}

    logits = jax.jit(lambda p, cast: (cast_matmul_weights(mdef.merge(p)) if cast else mdef.merge(p))(ids, mask),
                     static_argnums=1)
    np.testing.assert_array_equal(np.asarray(logits(params, True)), np.asarray(logits(params, False)))

    def sample(cast):
        sc = SamplingConfig(max_new_tokens=6, temperature=1.0, cast_weights=cast)
        fn = jax.jit(lambda p, key: generate(mdef.merge(p), ids, mask, key, sc, eos_token_id=-1, pad_token_id=PAD))
        return fn, np.asarray(fn(params, jax.random.key(3)).sequences)

    fn_cast, seq_cast = sample(True)
    _, seq_plain = sample(False)
    np.testing.assert_array_equal(seq_cast, seq_plain)

    # the lowered program: the decode loop's carried operands hold no f32 array of a weight matrix's shape
    hlo = fn_cast.lower(params, jax.random.key(3)).as_text()
    loops = [line for line in hlo.splitlines() if "stablehlo.while" in line]
    assert loops, "expected a while loop (the decode fori_loop)"
    shapes = {tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
              if str(getattr(path[-1], "key", "")) in ("kernel", "embedding")}
    carried_f32 = {tuple(int(d) for d in m.split("x")) for line in loops
                   for m in re.findall(r"tensor<((?:\d+x)+)f32>", line) for m in [m.rstrip("x")]}
    assert not (carried_f32 & shapes), f"fp32 weights carried into the decode loop: {carried_f32 & shapes}"
