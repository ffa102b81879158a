"""GPT-2 (HF ``GPT2LMHeadModel`` checkpoints and safe-rlhf ``GPT2ForScore`` score models) against the
transformers PyTorch reference: logits with and without left padding, the KV-cache decode path, greedy
generation, save/load round trips through transformers, the fused ``c_attn`` split/fuse, score models,
scan/remat/bf16 variants, mesh-sharded loading, vocabulary resizing and clear config errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import hf_reference
from safejax.generation import SamplingConfig, generate
from safejax.models import (CausalLM, ModelConfig, ScoreModel, init_cache, load_pretrained,
                            resize_token_embeddings, save_pretrained)
from safejax.parallel import MeshConfig, make_mesh

VOCAB, D, LAYERS, HEADS, NPOS = 64, 32, 2, 4, 64
B, T = 3, 11
PAD, BOS = 0, 1


def _gpt2_config(**kw) -> transformers.GPT2Config:
    base = dict(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=NPOS, initializer_range=0.3,
                bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    base.update(kw)
    return transformers.GPT2Config(**base)


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """HF initialises LayerNorms to (1, 0) and Conv1D biases to 0: perturb them so that a mix-up of
    weight/bias or of the q/k/v column blocks shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)


def _build(tmp_path_factory, name: str, seed: int = 0, **cfg_kw):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(_gpt2_config(**cfg_kw)).eval()
    _randomize_norms_and_biases(model)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """(torch GPT2LMHeadModel in eval mode, folder written by HF save_pretrained)."""
    return _build(tmp_path_factory, "hf-gpt2")


@pytest.fixture(scope="module")
def lm(hf_gpt2):
    return load_pretrained(hf_gpt2[1])


@pytest.fixture(scope="module")
def batch():
    assert B == 3
    return hf_reference.three_row_batch(VOCAB, T)  # rows 1 and 2 left-padded


_positions = hf_reference.positions
_hf_logits = hf_reference.hf_logits
_torch_hidden = hf_reference.hf_hidden


# ----------------------------------------------------------------------------- config and logits


def test_config_maps_gpt2_fields(hf_gpt2, lm):
    cfg = lm.config
    assert cfg.architecture == "gpt2" and cfg.norm_type == "layernorm" and cfg.position_embedding == "learned"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (D, 2, 4, 4, 8)
    assert cfg.intermediate_size == 4 * D and cfg.max_position_embeddings == NPOS  # n_inner None -> 4 * n_embd
    assert cfg.hidden_act == "gelu_new" and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    assert cfg.attention_bias and not cfg.gated_mlp
    assert lm.lm_head is None and lm.model.layers[0].mlp.gate_proj is None
    assert lm.model.embed_positions.embedding[...].shape == (NPOS, D)
    assert lm.model.layers[0].self_attn.o_proj.bias is not None
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg and hash(again) == hash(cfg)
    # the HF config transformers builds from our dict has the same GPT-2 fields
    hf_cfg = transformers.GPT2Config(**cfg.to_hf_dict())
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "activation_function",
                "layer_norm_epsilon", "scale_attn_weights"):
        assert getattr(hf_cfg, key) == getattr(hf_gpt2[0].config, key), key


def test_logits_match_transformers_without_padding(hf_gpt2, lm, batch):
    model, _ = hf_gpt2
    ids, _ = batch
    ref = _hf_logits(model, ids, np.ones_like(ids))
    out = np.asarray(lm(jnp.asarray(ids)))
    assert out.dtype == np.float32 and out.shape == (B, T, VOCAB)
    err = np.abs(out - ref).max()
    print(f"gpt2 no-pad max abs err {err:.2e} (|logits| max {np.abs(ref).max():.1f})")
    assert err <= 1e-4


def test_logits_match_transformers_with_left_padding(hf_gpt2, lm, batch):
    model, _ = hf_gpt2
    ids, mask = batch
    ref = _hf_logits(model, ids, mask)
    out = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(out).all()
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max()
    print(f"gpt2 left-pad max abs err {err:.2e}")
    assert err <= 1e-4
    # left padding does not shift the learned positions of the real tokens
    unpadded = np.asarray(lm(jnp.asarray(ids[2:, 6:])))
    np.testing.assert_allclose(out[2, 6:], unpadded[0], atol=1e-4)
    # positions matter: shifting them changes the logits
    shifted = np.asarray(lm(jnp.asarray(ids[2:, 6:]), positions=jnp.arange(5)[None] + 3))
    assert np.abs(shifted[0] - unpadded[0]).max() > 1e-2


def test_config_switches_match_transformers(tmp_path_factory, batch):
    """Exact GELU, no 1/sqrt(hd) scale, a non-default n_inner and epsilon, reorder_and_upcast_attn (precision
    only): the einsum and the jax.nn.dot_product_attention paths both match transformers."""
    model, folder = _build(tmp_path_factory, "hf-gpt2-switches", seed=1, activation_function="gelu",
                           scale_attn_weights=False, n_inner=48, layer_norm_epsilon=1e-3,
                           reorder_and_upcast_attn=True, initializer_range=0.2)
    ids, mask = batch
    ref = _hf_logits(model, ids, mask)
    valid = mask.astype(bool)
    ours = load_pretrained(folder)
    c = ours.config
    assert (c.hidden_act, c.scale_attn_weights, c.intermediate_size, c.rms_norm_eps) == ("gelu", False, 48, 1e-3)
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    err = np.abs(out - ref)[valid].max()
    print(f"gpt2 switches max abs err {err:.2e}")
    assert err <= 1e-4
    dpa = np.asarray(load_pretrained(folder, attention_impl="xla")(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(dpa - ref)[valid].max() <= 1e-4
    # each switch matters (so the parity above is not vacuous)
    for override in (dict(hidden_act="gelu_new"), dict(scale_attn_weights=True)):
        other = np.asarray(load_pretrained(folder, **override)(jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(other - ref)[valid].max() > 1e-5, override


# ----------------------------------------------------------------------------- KV cache and generation


def _decode_matches_full_forward(lm: CausalLM, ids, mask, prompt_len: int, max_len: int) -> float:
    """Prefill the left-padded prompt, then one token at a time (jitted step, traced cache_index, explicit
    positions as safejax.generation passes them); max abs err over valid positions vs the full forward."""
    full = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    graphdef, params = nnx.split(lm)
    pos_all = _positions(mask)

    @jax.jit
    def step(params, tok, kv_mask, pos, cache, i):
        return nnx.merge(graphdef, params)(tok, kv_mask, pos, cache=cache, cache_index=i)

    kv_mask = np.zeros((ids.shape[0], max_len), np.int32)
    kv_mask[:, :prompt_len] = mask[:, :prompt_len]
    cache = init_cache(lm.config, ids.shape[0], max_len)
    logits, cache = step(params, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(kv_mask),
                         jnp.asarray(pos_all[:, :prompt_len]), cache, jnp.int32(0))
    outs = [np.asarray(logits)]
    for i in range(prompt_len, ids.shape[1]):
        kv_mask[:, i] = 1
        logits, cache = step(params, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(kv_mask),
                             jnp.asarray(pos_all[:, i:i + 1]), cache, jnp.int32(i))
        outs.append(np.asarray(logits))
    dec = np.concatenate(outs, axis=1)
    return float(np.abs(dec - full)[mask.astype(bool)].max())


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_matches_full_forward(hf_gpt2, lm, batch, scan):
    ids, mask = batch
    model = load_pretrained(hf_gpt2[1], scan_layers=True) if scan else lm
    err = _decode_matches_full_forward(model, ids, mask, prompt_len=7, max_len=T + 3)
    print(f"gpt2 scan={scan} kv-cache decode max abs err {err:.2e}")
    assert err <= 1e-4


GEN_P, GEN_N = 7, 10
GEN_LENGTHS = [7, 3, 5, 1, 6, 2]


def _hf_generate(hf, ids, mask, eos):
    return hf_reference.hf_greedy_generate(hf, ids, mask, new_tokens=GEN_N, pad=PAD, eos=eos, bos=BOS)


def test_greedy_generate_matches_transformers_token_for_token(hf_gpt2, lm):
    """Left-padded prompts.  transformers' generate derives GPT-2 ``position_ids`` from the attention mask
    (``cumsum(mask) - 1``, 0 on padding, then +1 per new token), the same rule as ours
    (``max(cumsum(mask) - 1, 0)``), so padded rows are compared too.  Some rows stop at EOS early."""
    hf, _ = hf_gpt2
    ids, mask = hf_reference.left_padded_prompts(GEN_LENGTHS, GEN_P, VOCAB, PAD)
    free = _hf_generate(hf, ids, mask, eos=VOCAB + 7)
    # an EOS generated mid-way in some rows but not all
    resp = free[:, GEN_P:-2]
    counts = {tok: int((resp == tok).any(axis=1).sum()) for tok in range(3, VOCAB)}
    eos = max((t for t in counts if 0 < counts[t] < len(GEN_LENGTHS)), key=lambda t: counts[t])
    ref = _hf_generate(hf, ids, mask, eos=eos)
    stopped = (ref[:, GEN_P:] == eos).any(axis=1)
    assert stopped.any() and not stopped.all()
    cfg = SamplingConfig(max_new_tokens=GEN_N, greedy=True)
    run = jax.jit(lambda i, m: generate(lm, i, m, jax.random.key(0), cfg, eos_token_id=eos, pad_token_id=PAD))
    out = jax.tree.map(np.asarray, run(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(out.sequences, ref)
    np.testing.assert_array_equal(out.attention_mask[:, :GEN_P], mask)


# ----------------------------------------------------------------------------- save / load


def test_saved_folder_loads_in_transformers_identically(hf_gpt2, lm, batch, tmp_path):
    model, folder = hf_gpt2
    ids, mask = batch
    save_pretrained(lm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["n_inner"]) == (D, 2, 4, NPOS, 4 * D)
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    ours_t = load_file(str(tmp_path / "model.safetensors"))
    theirs_t = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.weight" not in ours_t
    assert set(ours_t) == {k for k in theirs_t if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for k, v in theirs_t.items():  # the fused c_attn (and every Conv1D) written back bit for bit
        np.testing.assert_array_equal(ours_t[k], v, err_msg=k)
    assert ours_t["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is transformers.GPT2LMHeadModel
    err = np.abs(_hf_logits(again, ids, mask) - _hf_logits(model, ids, mask)).max()
    print(f"gpt2 saved folder in transformers max abs err {err:.2e}")
    assert err <= 1e-5
    ours = np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(ours, np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask))))


def test_old_attention_mask_buffers_are_ignored(hf_gpt2, lm, batch, tmp_path):
    """Older GPT-2 checkpoints carry attn.bias / attn.masked_bias buffers: loaded without a warning."""
    _, folder = hf_gpt2
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for i in range(LAYERS):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((NPOS, NPOS), np.float32))[None, None]
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["transformer.h.0.attn.extra"] = np.zeros(2, np.float32)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids, mask = batch
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors are not used.*attn\.extra"):
        loaded = load_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask))))


# ----------------------------------------------------------------------------- score models


class _TorchGPT2ForScore(torch.nn.Module):
    """safe-rlhf's GPT2ForScore naming: the GPT2Model under ``transformer.``, ``score_head`` nn.Linear."""

    def __init__(self, config, score_dim=1):
        super().__init__()
        self.transformer = transformers.GPT2Model(config)
        self.score_head = torch.nn.Linear(config.n_embd, score_dim, bias=True)


@pytest.fixture(scope="module")
def score_folder(tmp_path_factory):
    torch.manual_seed(2)
    ref = _TorchGPT2ForScore(_gpt2_config()).eval()
    _randomize_norms_and_biases(ref)
    folder = tmp_path_factory.mktemp("gpt2-score")
    save_file({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(ref.transformer.config.to_json_string(use_diff=False))
    cfg.update(architectures=["GPT2ForScore"], score_dim=1, bias=True, score_type="reward")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return ref, str(folder)


def test_gpt2_score_checkpoint_matches_torch_backbone_plus_head(score_folder, batch):
    ref, folder = score_folder
    ids, mask = batch
    names = set(load_file(os.path.join(folder, "model.safetensors")))
    assert "transformer.h.0.attn.c_attn.weight" in names and "score_head.weight" in names
    for model_type in (None, "score"):
        sm = load_pretrained(folder, model_type=model_type)
        assert isinstance(sm, ScoreModel) and sm.config.architecture == "gpt2" and sm.score_type == "reward"
        out = sm(jnp.asarray(ids), jnp.asarray(mask))
        with torch.no_grad():
            want = ref.score_head(torch.tensor(_torch_hidden(ref.transformer, ids, mask))).numpy()[..., 0]
        valid = mask.astype(bool)
        err = np.abs(np.asarray(out.scores) - want)[valid].max()
        print(f"gpt2 score model vs torch max abs err {err:.2e}")
        assert err <= 1e-4
        np.testing.assert_allclose(np.asarray(out.end_scores), want[:, -1], atol=1e-4)  # left padded: end = T-1


def test_causal_gpt2_loaded_as_score_gets_fresh_head(hf_gpt2, batch):
    model, folder = hf_gpt2
    ids, mask = batch
    sm = load_pretrained(folder, model_type="score", seed=3)
    assert isinstance(sm, ScoreModel) and not hasattr(sm, "lm_head")
    w = np.asarray(sm.score_head.kernel[...])
    assert w.shape == (D, 1) and 0.1 < w.std() < 1.0  # normal(initializer_range=0.3)
    np.testing.assert_array_equal(np.asarray(sm.score_head.bias[...]), np.zeros(1))
    out = np.asarray(sm(jnp.asarray(ids), jnp.asarray(mask)).scores)
    want = (_torch_hidden(model.transformer, ids, mask) @ w)[..., 0]
    assert np.abs(out - want)[mask.astype(bool)].max() <= 1e-4


def test_gpt2_score_model_save_round_trip(score_folder, batch, tmp_path):
    _, folder = score_folder
    ids, mask = batch
    sm = load_pretrained(folder)
    save_pretrained(sm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForScore"] and cfg["model_type"] == "gpt2"
    assert cfg["score_dim"] == 1 and cfg["bias"] is True and cfg["score_type"] == "reward"
    saved = load_file(str(tmp_path / "model.safetensors"))
    src = load_file(os.path.join(folder, "model.safetensors"))
    assert set(saved) == set(src)
    for k in src:
        np.testing.assert_array_equal(saved[k], src[k], err_msg=k)
    again = load_pretrained(tmp_path)
    a, b = sm(jnp.asarray(ids), jnp.asarray(mask)), again(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(np.asarray(a.end_scores), np.asarray(b.end_scores))


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("variant", [dict(remat=True), dict(scan_layers=True), dict(scan_layers=True, remat=True)])
def test_remat_and_scan_variants_give_same_logits_and_grads(hf_gpt2, lm, batch, variant):
    ids, mask = (jnp.asarray(x) for x in batch)
    other = load_pretrained(hf_gpt2[1], **variant)
    assert np.abs(np.asarray(other(ids, mask)) - np.asarray(lm(ids, mask))).max() <= 1e-5

    def loss_fn(m):
        return jnp.sum(jax.nn.logsumexp(m(ids, mask), -1) * mask) / jnp.sum(mask)

    g_ref, g_out = nnx.grad(loss_fn)(lm).model, nnx.grad(loss_fn)(other).model
    for name in ("embed_tokens", "embed_positions"):
        a = np.asarray(getattr(g_out, name).embedding[...])
        b = np.asarray(getattr(g_ref, name).embedding[...])
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(hf_gpt2, lm, batch):
    ids, mask = batch
    bf = load_pretrained(hf_gpt2[1], dtype="bfloat16")
    assert bf.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    assert bf.model.embed_positions.embedding[...].dtype == jnp.float32
    out = np.asarray(bf(jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32
    valid = mask.astype(bool)
    rel = np.abs(out - ref)[valid].max() / np.abs(ref).max()
    assert 0 < rel < 0.1
    assert init_cache(bf.config, 1, 4).k[0].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- sharding


_spec = hf_reference.spec_of


@pytest.mark.parametrize("scan", [False, True])
def test_load_with_mesh_equals_plain_load(hf_gpt2, lm, batch, scan):
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfig(2, 2, 2))
    sharded = load_pretrained(hf_gpt2[1], mesh=mesh, scan_layers=scan)
    lead = (None,) if scan else ()
    layer = sharded.model.layers if scan else sharded.model.layers[0]
    wpe = sharded.model.embed_positions.embedding[...]
    assert _spec(wpe) == P(None, "fsdp")
    np.testing.assert_array_equal(np.asarray(wpe), np.asarray(lm.model.embed_positions.embedding[...]))
    # q / k / v are column blocks of c_attn: every shard was read from the right block of the file
    for proj in ("q_proj", "k_proj", "v_proj"):
        for leaf in ("kernel", "bias"):
            x = getattr(getattr(layer.self_attn, proj), leaf)[...]
            want = np.stack([np.asarray(getattr(getattr(l.self_attn, proj), leaf)[...]) for l in lm.model.layers])
            want = want if scan else want[0]
            if leaf == "kernel":
                assert _spec(x) == P(*lead, "fsdp", "tensor") and x.addressable_shards[0].data.size == x.size // 4
            for shard in x.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    fc = layer.mlp.up_proj.kernel[...]
    assert _spec(fc) == P(*lead, "fsdp", "tensor")
    ids, mask = batch
    graphdef, params = nnx.split(sharded)
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))(params, ids, mask))
    err = np.abs(out - np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))).max()
    print(f"gpt2 scan={scan} sharded load max abs err {err:.2e}")
    assert err <= 1e-5


# ----------------------------------------------------------------------------- vocabulary and bad input


def test_resize_token_embeddings_grows_tied_wte_and_saves(hf_gpt2, tmp_path):
    lm = load_pretrained(hf_gpt2[1])
    emb0 = np.asarray(lm.model.embed_tokens.embedding[...])
    wpe0 = np.asarray(lm.model.embed_positions.embedding[...])
    resize_token_embeddings(lm, VOCAB + 4)
    assert lm.config.vocab_size == VOCAB + 4 and lm.lm_head is None
    emb = np.asarray(lm.model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(emb[:VOCAB], emb0)
    np.testing.assert_allclose(emb[VOCAB:], np.tile(emb0.mean(0), (4, 1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lm.model.embed_positions.embedding[...]), wpe0)
    ids = jnp.asarray([[1, VOCAB + 3, 5]], jnp.int32)
    logits = np.asarray(lm(ids))
    assert logits.shape == (1, 3, VOCAB + 4)
    save_pretrained(lm, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf) is transformers.GPT2LMHeadModel and hf.config.vocab_size == VOCAB + 4
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    assert np.abs(ref - logits).max() <= 1e-4


@pytest.mark.parametrize("key, value, match", [
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("activation_function", "gelu_10", "activation_function 'gelu_10'"),
    ("add_cross_attention", True, "add_cross_attention"),
])
def test_unsupported_gpt2_config_names_file_and_key(hf_gpt2, tmp_path, key, value, match):
    _, folder = hf_gpt2
    shutil.copytree(folder, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(tmp_path / "m")
    assert str(cfg_path) in str(e.value)


def test_gpt2_config_rejects_grouped_query_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    architecture="gpt2", hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                    architecture="llama", hidden_act="gelu_new")
