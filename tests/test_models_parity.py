"""CausalLM against the transformers PyTorch reference (Llama GQA + llama3 RoPE, Mistral sliding
window, Qwen2 biases + tied embeddings), the KV-cache decode path, and the remat / scan variants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_reference
from safejax.models import CausalLM, ModelConfig, init_cache, load_pretrained, save_pretrained

VOCAB = 96
B, T = 3, 11


def _hf_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, max_position_embeddings=128)
    if arch == "llama":
        return transformers.LlamaConfig(
            **common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=4,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    raise AssertionError(arch)


_HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
               "qwen2": transformers.Qwen2ForCausalLM}


_BUILT: dict = {}


def _build_hf(arch: str, tmp_path_factory):
    """(arch, torch model in eval mode, folder written by HF save_pretrained), built once per arch."""
    if arch in _BUILT:
        return _BUILT[arch]
    torch.manual_seed(0)
    model = _HF_CLASSES[arch](_hf_config(arch)).eval()
    if arch == "qwen2":  # HF inits biases to zero; make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp(f"hf-{arch}")
    model.save_pretrained(folder)
    _BUILT[arch] = (arch, model, str(folder))
    return _BUILT[arch]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def hf_model(request, tmp_path_factory):
    return _build_hf(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build_hf("llama", tmp_path_factory)


_LOADED: dict = {}


def _load_default(folder):
    if folder not in _LOADED:
        _LOADED[folder] = load_pretrained(folder)
    return _LOADED[folder]


@pytest.fixture(scope="module")
def batch():
    assert B == 3
    return hf_reference.three_row_batch(VOCAB, T)  # rows 1 and 2 left-padded


_hf_logits = hf_reference.hf_logits


@pytest.fixture(scope="module")
def loaded(hf_model):
    return _load_default(hf_model[2])


def test_config_maps_hf_fields(hf_model, loaded):
    arch, model, _ = hf_model
    cfg = loaded.config
    assert cfg.architecture == arch
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
    if arch == "llama":
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict["rope_type"] == "llama3"
        ref = model.model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(cfg.rope_inv_freq(), ref, rtol=1e-6)
    if arch == "mistral":
        assert cfg.sliding_window == 4 and cfg.rope_theta == 1000.0
    if arch == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings and loaded.lm_head is None
        assert loaded.model.layers[0].self_attn.o_proj.bias is None
    assert hash(cfg) == hash(ModelConfig.from_hf_dict(cfg.to_hf_dict()))


def test_logits_match_transformers_without_padding(hf_model, loaded, batch):
    _, model, _ = hf_model
    ids, _ = batch
    ref = _hf_logits(model, ids, np.ones_like(ids))
    out = np.asarray(loaded(jnp.asarray(ids)))
    assert out.dtype == np.float32 and out.shape == (B, T, VOCAB)
    err = np.abs(out - ref).max()
    print(f"{hf_model[0]} no-pad max abs err {err:.2e} (|logits| max {np.abs(ref).max():.1f})")
    assert err <= 1e-4


def test_logits_match_transformers_with_left_padding(hf_model, loaded, batch):
    _, model, _ = hf_model
    ids, mask = batch
    ref = _hf_logits(model, ids, mask)
    out = np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(out).all()  # fully masked query rows (left padding) are not NaN
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max()
    print(f"{hf_model[0]} left-pad max abs err {err:.2e}")
    assert err <= 1e-4
    if hf_model[0] == "mistral":  # the window (4 < T) matters: without it the logits differ
        no_window = load_pretrained(hf_model[2], sliding_window=None)
        assert np.abs(np.asarray(no_window(jnp.asarray(ids), jnp.asarray(mask))) - ref)[valid].max() > 1e-2
    # left padding does not change the real tokens' logits
    unpadded = np.asarray(loaded(jnp.asarray(ids[2:, 6:])))
    np.testing.assert_allclose(out[2, 6:], unpadded[0], atol=1e-4)


def test_saved_folder_loads_in_transformers_identically(hf_model, loaded, batch, tmp_path):
    _, model, _ = hf_model
    ids, mask = batch
    save_pretrained(loaded, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    ref = _hf_logits(model, ids, mask)
    out = _hf_logits(again, ids, mask)
    assert np.abs(out - ref).max() <= 1e-5
    # and back into safejax
    ours = np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)


@pytest.mark.parametrize("variant", [dict(remat=True), dict(scan_layers=True), dict(scan_layers=True, remat=True)])
def test_remat_and_scan_variants_give_same_logits(llama, batch, variant):
    ids, mask = batch
    loaded = _load_default(llama[2])
    other = load_pretrained(llama[2], **variant)
    ref = np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)))
    out = np.asarray(other(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out - ref).max() <= 1e-5

    def loss_fn(m):
        logits = m(jnp.asarray(ids), jnp.asarray(mask))
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    g_ref = nnx.grad(loss_fn)(loaded).model.embed_tokens.embedding[...]
    g_out = nnx.grad(loss_fn)(other).model.embed_tokens.embedding[...]
    np.testing.assert_allclose(np.asarray(g_out), np.asarray(g_ref), atol=1e-5)



def test_dot_product_attention_impl_matches_transformers_and_einsum(hf_model, loaded, batch):
    """``attention_impl="xla"`` (jax.nn.dot_product_attention, the code path ``"cudnn"`` shares on GPUs) gives
    the transformers logits on a left-padded batch (GQA, llama3 RoPE, Mistral's window, Qwen2 biases), and the
    same gradients as the default einsum attention under a loss over real positions."""
    _, model, folder = hf_model
    ids, mask = (jnp.asarray(x) for x in batch)
    dpa = load_pretrained(folder, attention_impl="xla")
    assert dpa.config.attention_impl == "xla" and loaded.config.attention_impl == "einsum"
    ref = _hf_logits(model, *batch)
    valid = batch[1].astype(bool)
    out = np.asarray(dpa(ids, mask))
    assert np.abs(out - ref)[valid].max() <= 1e-4

    def loss_fn(m):
        logits = m(ids, mask)
        return jnp.sum(jax.nn.logsumexp(logits, -1) * mask) / jnp.sum(mask)

    g_ref = jax.tree.leaves(nnx.state(nnx.grad(loss_fn)(loaded), nnx.Param))
    g_out = jax.tree.leaves(nnx.state(nnx.grad(loss_fn)(dpa), nnx.Param))
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    with pytest.raises(ValueError, match="attention_impl"):
        load_pretrained(folder, attention_impl="flash")

def _decode_matches_full_forward(lm: CausalLM, ids, mask, prompt_len: int, max_len: int):
    """Prefill the left-padded prompt, then feed the remaining tokens one at a time (jitted step with
    a traced cache_index); returns (max abs err over valid positions, steps)."""
    total = ids.shape[1]
    full = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    graphdef, params = nnx.split(lm)

    @jax.jit
    def step(params, tok, kv_mask, cache, i):
        return nnx.merge(graphdef, params)(tok, kv_mask, cache=cache, cache_index=i)

    kv_mask = np.zeros((ids.shape[0], max_len), np.int32)
    kv_mask[:, :prompt_len] = mask[:, :prompt_len]
    cache = init_cache(lm.config, ids.shape[0], max_len)
    logits, cache = step(params, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(kv_mask), cache, jnp.int32(0))
    outs = [np.asarray(logits)]
    for i in range(prompt_len, total):
        kv_mask[:, i] = 1
        logits, cache = step(params, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(kv_mask), cache, jnp.int32(i))
        outs.append(np.asarray(logits))
    dec = np.concatenate(outs, axis=1)
    valid = mask.astype(bool)
    return np.abs(dec - full)[valid].max()


def test_kv_cache_decode_matches_full_forward(hf_model, loaded, batch):
    ids, mask = batch
    prompt_len = 7  # rows 1 and 2 are left padded inside the prompt
    err = _decode_matches_full_forward(loaded, ids, mask, prompt_len, max_len=T + 3)
    print(f"{hf_model[0]} kv-cache decode max abs err {err:.2e}")
    assert err <= 1e-4


def test_kv_cache_decode_with_scanned_layers(llama, batch):
    ids, mask = batch
    lm = load_pretrained(llama[2], scan_layers=True)
    assert lm.config.scan_layers and init_cache(lm.config, 2, 5).k.shape == (2, 2, 2, 5, 8)  # [L, B, KV, S, hd]
    assert _decode_matches_full_forward(lm, ids, mask, 7, max_len=T) <= 1e-4


def test_bfloat16_compute_keeps_float32_params_and_logits(llama, batch):
    ids, mask = batch
    loaded = _load_default(llama[2])
    lm = load_pretrained(llama[2], dtype="bfloat16")
    assert lm.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    out = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32
    valid = mask.astype(bool)
    rel = np.abs(out - ref)[valid].max() / np.abs(ref).max()
    assert 0 < rel < 0.1
    assert init_cache(lm.config, 1, 4).k[0].dtype == jnp.bfloat16
