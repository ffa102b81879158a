"""HF folder I/O: score models (safe-rlhf layout), sharded / bfloat16 checkpoints, vocabulary resizing,
tokenizer checks, and clear errors on bad folders."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_reference
from safejax.models import (CausalLM, ScoreModel, ScoreOutput, check_tokenizer_fits, load_pretrained,
                            resize_token_embeddings, save_pretrained)

VOCAB, D = 96, 32


def _llama_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.5)
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    folder = tmp_path_factory.mktemp("causal")
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def safe_rlhf_score_folder(causal_folder, tmp_path_factory):
    """A score checkpoint written the way safe-rlhf's LlamaForScore saves (built here with numpy, not by us)."""
    _, src = causal_folder
    tensors = {k: v for k, v in load_file(os.path.join(src, "model.safetensors")).items() if k != "lm_head.weight"}
    rng = np.random.RandomState(0)
    head_w = rng.normal(0, 0.5, (1, D)).astype(np.float32)
    head_b = np.array([0.25], np.float32)
    tensors["score_head.weight"], tensors["score_head.bias"] = head_w, head_b
    folder = tmp_path_factory.mktemp("score")
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["LlamaForScore"], score_dim=1, score_type="reward", bias=True,
               normalizer_type="ExponentialMovingAverage")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(folder), head_w, head_b


@pytest.fixture(scope="module")
def padded_batch():
    rng = np.random.RandomState(2)
    ids = rng.randint(0, VOCAB, (4, 9)).astype(np.int32)
    mask = np.ones((4, 9), np.int32)
    mask[0, 6:] = 0  # right padded
    mask[1, :4] = 0  # left padded
    mask[3, 8:] = 0
    return ids, mask


def _torch_hidden(model, ids, mask):
    return hf_reference.hf_hidden(model.model, ids, mask)


def _last_index(mask):
    return np.array([np.nonzero(row)[0].max() for row in mask])


def test_safe_rlhf_score_checkpoint_matches_torch_backbone_plus_head(causal_folder, safe_rlhf_score_folder,
                                                                      padded_batch):
    model, _ = causal_folder
    folder, head_w, head_b = safe_rlhf_score_folder
    ids, mask = padded_batch
    sm = load_pretrained(folder)
    assert isinstance(sm, ScoreModel) and sm.score_dim == 1 and sm.score_type == "reward"
    out = sm(jnp.asarray(ids), jnp.asarray(mask))
    assert isinstance(out, ScoreOutput) and out.scores.shape == (4, 9) and out.end_scores.shape == (4,)
    assert out.scores.dtype == jnp.float32
    ref = (_torch_hidden(model, ids, mask) @ head_w.T + head_b)[..., 0]
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out.scores) - ref)[valid].max()
    print(f"score model vs torch max abs err {err:.2e}")
    assert err <= 1e-4
    end = _last_index(mask)
    np.testing.assert_allclose(np.asarray(out.end_scores), ref[np.arange(4), end], atol=1e-4)


def test_score_model_save_load_round_trip_is_identical(safe_rlhf_score_folder, padded_batch, tmp_path):
    folder, _, _ = safe_rlhf_score_folder
    ids, mask = padded_batch
    sm = load_pretrained(folder)
    save_pretrained(sm, tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForScore"] and cfg["score_dim"] == 1 and cfg["bias"] is True
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["score_head.weight"].shape == (1, D) and tensors["score_head.bias"].shape == (1,)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == np.float32
    again = load_pretrained(tmp_path)
    a = sm(jnp.asarray(ids), jnp.asarray(mask))
    b = again(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(np.asarray(a.end_scores), np.asarray(b.end_scores))


def test_score_model_from_causal_checkpoint_gets_fresh_head(causal_folder, padded_batch):
    model, folder = causal_folder
    ids, mask = padded_batch
    sm = load_pretrained(folder, model_type="score", seed=3)
    assert isinstance(sm, ScoreModel) and not hasattr(sm, "lm_head")
    w = np.asarray(sm.score_head.kernel[...])
    assert w.shape == (D, 1)
    assert 0.1 < w.std() < 1.0  # normal(initializer_range=0.5)
    np.testing.assert_array_equal(np.asarray(sm.score_head.bias[...]), np.zeros(1))
    other = load_pretrained(folder, model_type="score", seed=4)
    assert not np.allclose(np.asarray(other.score_head.kernel[...]), w)
    out = sm(jnp.asarray(ids), jnp.asarray(mask))
    ref = (_torch_hidden(model, ids, mask) @ w)[..., 0]
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out.scores) - ref)[valid].max() <= 1e-4
    # end scores: last index where mask == 1, for right- and left-padded rows alike
    end = _last_index(mask)
    assert list(end) == [5, 8, 8, 7]
    np.testing.assert_array_equal(np.asarray(out.end_scores), np.asarray(out.scores)[np.arange(4), end])
    # no mask: the last position
    nomask = sm(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(nomask.end_scores), np.asarray(nomask.scores)[:, -1])


def test_score_checkpoint_cannot_load_as_causal_lm(safe_rlhf_score_folder):
    with pytest.raises(ValueError, match="model_type='score'"):
        load_pretrained(safe_rlhf_score_folder[0], model_type="causal_lm")


def test_sharded_index_checkpoint_loads(causal_folder, tmp_path):
    model, _ = causal_folder
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    lm = load_pretrained(tmp_path)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(np.asarray(lm(jnp.asarray(ids))) - ref).max() <= 1e-4


def test_bfloat16_checkpoint_loads_exact_values(causal_folder, tmp_path):
    model, _ = causal_folder
    bf = transformers.LlamaForCausalLM(model.config)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    bf.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_dtype() == "BF16"
    lm = load_pretrained(tmp_path)
    ref = bf.model.layers[1].self_attn.k_proj.weight.float().detach().numpy()  # [KV*hd, D]
    ours = np.asarray(lm.model.layers[1].self_attn.k_proj.kernel[...])  # [D, KV, hd]
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.reshape(D, -1).T, ref)


def test_resize_token_embeddings_adds_mean_rows_and_saves(causal_folder, tmp_path):
    _, folder = causal_folder
    lm = load_pretrained(folder)
    emb0 = np.asarray(lm.model.embed_tokens.embedding[...])
    head0 = np.asarray(lm.lm_head.kernel[...])
    resize_token_embeddings(lm, VOCAB + 4)
    assert lm.config.vocab_size == VOCAB + 4 and lm.model.config.vocab_size == VOCAB + 4
    emb = np.asarray(lm.model.embed_tokens.embedding[...])
    head = np.asarray(lm.lm_head.kernel[...])
    np.testing.assert_array_equal(emb[:VOCAB], emb0)
    np.testing.assert_allclose(emb[VOCAB:], np.tile(emb0.mean(0), (4, 1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head[:, VOCAB:], np.tile(head0.mean(1, keepdims=True), (1, 4)), rtol=1e-6, atol=1e-6)
    ids = jnp.asarray([[1, VOCAB + 3, 5]], jnp.int32)
    logits = np.asarray(lm(ids))
    assert logits.shape == (1, 3, VOCAB + 4)
    save_pretrained(lm, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == VOCAB + 4
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    assert np.abs(ref - logits).max() <= 1e-4


def _word_tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="</s>")


def test_tokenizer_larger_than_embedding_is_rejected_naming_path(causal_folder, tmp_path):
    _, folder = causal_folder
    lm = load_pretrained(folder)
    check_tokenizer_fits(_word_tokenizer(50), lm.config, folder)  # 53 <= 96 fits
    big = _word_tokenizer(120)
    with pytest.raises(ValueError, match=r"123 tokens.*96") as e:
        check_tokenizer_fits(big, lm.config, folder)
    assert folder in str(e.value)
    resize_token_embeddings(lm, len(big))
    check_tokenizer_fits(big, lm, folder)  # a model is accepted too
    save_pretrained(lm, tmp_path, tokenizer=big)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 123 and again("w7 w9")["input_ids"] == [10, 12]


# ----------------------------------------------------------------------------- bad folders


def test_folder_without_config_json_names_the_file(tmp_path):
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"config\.json"):
        load_pretrained(tmp_path)


def test_unsupported_architecture_names_config_and_architecture(causal_folder, tmp_path):
    _, folder = causal_folder
    shutil.copytree(folder, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM") as e:
        load_pretrained(tmp_path / "m")
    assert str(cfg_path) in str(e.value)


def test_wrong_tensor_shape_names_file_and_tensor(causal_folder, tmp_path):
    _, folder = causal_folder
    shutil.copytree(folder, tmp_path / "m")
    path = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((65, D), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[65, 32\].*\[64, 32\]") as e:
        load_pretrained(tmp_path / "m")
    assert path in str(e.value)


def test_missing_tensor_is_named(causal_folder, tmp_path):
    _, folder = causal_folder
    shutil.copytree(folder, tmp_path / "m")
    path = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.post_attention_layernorm\.weight.*missing"):
        load_pretrained(tmp_path / "m")


def test_pickle_only_folder_asks_for_safetensors_conversion(causal_folder, tmp_path):
    _, folder = causal_folder
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled by safejax")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_pretrained(tmp_path)


def test_missing_weights_and_bad_model_type_are_reported(causal_folder, tmp_path):
    _, folder = causal_folder
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="no weights found"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        load_pretrained(folder, model_type="seq2seq")


def test_new_model_save_is_loadable_by_transformers(tmp_path):
    """A freshly initialised (not loaded) safejax model exports to a folder transformers reads."""
    from safejax.models import ModelConfig

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=1, architecture="mistral", sliding_window=3, eos_token_id=2, scan_layers=True)
    with nnx.use_eager_sharding(False):
        lm = CausalLM(cfg, rngs=nnx.Rngs(0))
    save_pretrained(lm, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 3
    ids = np.arange(7, dtype=np.int32)[None] * 5
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(np.asarray(lm(jnp.asarray(ids))) - ref).max() <= 1e-5
