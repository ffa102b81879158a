"""Models on the 8 fake CPU devices: a (2, 2, 2) data/fsdp/tensor mesh gives the single-device
logits, params carry the NamedShardings of the logical-axis rules, and checkpoints load sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_reference import spec_of as _spec
from safejax.models import CausalLM, ModelConfig, ScoreModel, load_pretrained
from safejax.parallel import MeshConfig, make_mesh, use_mesh

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  initializer_range=0.1)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh(MeshConfig(2, 2, 2))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 96, (4, 8)).astype(np.int32)
    mask = np.ones((4, 8), np.int32)
    mask[1, :3] = 0
    return ids, mask


def _jit_logits(model, ids, mask, mesh=None):
    graphdef, params = nnx.split(model)

    @jax.jit
    def fwd(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    if mesh is None:
        return np.asarray(fwd(params, ids, mask))
    with jax.set_mesh(mesh):
        return np.asarray(fwd(params, ids, mask))




@pytest.mark.parametrize("scan", [False, True])
def test_mesh_built_model_matches_single_device_and_is_sharded(mesh, batch, scan):
    cfg = CFG.replace(scan_layers=scan)
    with nnx.use_eager_sharding(False):
        single = CausalLM(cfg, rngs=nnx.Rngs(0))
    with use_mesh(mesh):
        sharded = CausalLM(cfg, rngs=nnx.Rngs(0))
    ids, mask = batch
    ref = _jit_logits(single, ids, mask)
    out = _jit_logits(sharded, ids, mask, mesh)
    err = np.abs(out - ref).max()
    print(f"scan={scan} mesh vs single max abs err {err:.2e}")
    assert err <= 1e-5

    lead = (None,) if scan else ()
    layer = sharded.model.layers if scan else sharded.model.layers[0]
    gate = layer.mlp.gate_proj.kernel[...]
    assert _spec(gate) == P(*lead, "fsdp", "tensor") and not gate.sharding.is_fully_replicated
    assert _spec(layer.mlp.down_proj.kernel[...]) == P(*lead, "tensor", "fsdp")
    assert _spec(layer.self_attn.q_proj.kernel[...]) == P(*lead, "fsdp", "tensor")
    assert _spec(layer.self_attn.k_proj.kernel[...]) == P(*lead, "fsdp", "tensor")
    assert _spec(layer.self_attn.o_proj.kernel[...]) == P(*lead, "tensor", None, "fsdp")
    assert _spec(sharded.model.embed_tokens.embedding[...]) == P("tensor", "fsdp")
    assert _spec(sharded.lm_head.kernel[...]) == P("fsdp", "tensor")
    assert sharded.model.norm.weight[...].sharding.is_fully_replicated
    # a shard holds a quarter of the mlp kernel (fsdp=2 x tensor=2)
    assert gate.addressable_shards[0].data.size == gate.size // 4
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(
        (single.model.layers if scan else single.model.layers[0]).mlp.gate_proj.kernel[...]))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("hf-shard")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("scan", [False, True])
def test_load_with_mesh_gives_sharded_params_equal_to_plain_load(mesh, batch, hf_folder, scan):
    plain = load_pretrained(hf_folder)
    sharded = load_pretrained(hf_folder, mesh=mesh, scan_layers=scan)
    lead = (None,) if scan else ()
    layer = sharded.model.layers if scan else sharded.model.layers[0]
    up = layer.mlp.up_proj.kernel[...]
    assert _spec(up) == P(*lead, "fsdp", "tensor") and up.addressable_shards[0].data.size == up.size // 4
    q = layer.self_attn.q_proj.kernel[...]
    assert _spec(q) == P(*lead, "fsdp", "tensor")
    q_plain = np.asarray(plain.model.layers[0].self_attn.q_proj.kernel[...])
    np.testing.assert_array_equal(np.asarray(q)[0] if scan else np.asarray(q), q_plain)
    for shard in q.addressable_shards:  # every shard was read from the right block of the file
        full = np.stack([np.asarray(l.self_attn.q_proj.kernel[...]) for l in plain.model.layers]) if scan else q_plain
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    ids, mask = batch
    err = np.abs(_jit_logits(sharded, ids, mask, mesh) - _jit_logits(plain, ids, mask)).max()
    assert err <= 1e-5


def test_score_model_loads_sharded_with_fresh_head(mesh, batch, hf_folder):
    sm = load_pretrained(hf_folder, mesh=mesh, model_type="score")
    assert isinstance(sm, ScoreModel)
    assert isinstance(sm.score_head.kernel[...].sharding, NamedSharding)
    assert _spec(sm.model.layers[1].mlp.gate_proj.kernel[...]) == P("fsdp", "tensor")
    plain = load_pretrained(hf_folder, model_type="score")
    np.testing.assert_array_equal(np.asarray(sm.score_head.kernel[...]), np.asarray(plain.score_head.kernel[...]))
    ids, mask = batch
    with jax.set_mesh(mesh):
        out = sm(jnp.asarray(ids), jnp.asarray(mask))
    ref = plain(jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(out.end_scores) - np.asarray(ref.end_scores)).max() <= 1e-5


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    return ca[0] if isinstance(ca, (list, tuple)) else ca


@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_train_step_shards_activations_by_batch_and_splits_the_work(scan):
    """Under ``mesh_jit`` the residual stream and the logits are split over the batch (data x fsdp), as FSDP
    wants; each of 8 devices does about 1/8 of the one-device FLOPs.  Plain ``jax.jit`` follows the
    FSDP-sharded weights instead and leaves the batch split over ``data`` only (more FLOPs and more than
    1.5x the bytes per device)."""
    from safejax.parallel import input_sharding, mesh_jit
    from safejax.models.functional import split_model

    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, scan_layers=scan)
    seen = {}

    def make(mesh):
        with use_mesh(mesh):
            mdef, params = split_model(CausalLM(cfg, rngs=nnx.Rngs(0)))
        ids = jax.device_put(np.ones((16, 32), np.int32), input_sharding(mesh, 2))

        def loss(p, ids):
            lm = mdef.merge(p)
            h = lm.hidden_states(ids)
            jax.debug.inspect_array_sharding(h, callback=lambda s: seen.__setitem__("hidden", s))
            logits = lm.logits_from_hidden(h)
            jax.debug.inspect_array_sharding(logits, callback=lambda s: seen.__setitem__("logits", s))
            return jnp.mean(jax.nn.logsumexp(logits, -1))

        return jax.grad(loss), params, ids

    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    fn, params, ids = make(one)
    flops_one = _cost(mesh_jit(fn, mesh=one).lower(params, ids).compile())["flops"]

    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    fn, params, ids = make(mesh)
    ours = _cost(mesh_jit(fn, mesh=mesh).lower(params, ids).compile())
    assert seen["hidden"].spec[0] == ("data", "fsdp") and seen["logits"].spec[0] == ("data", "fsdp")
    assert ours["flops"] == pytest.approx(flops_one / 8, rel=0.2)
    plain = _cost(jax.jit(fn).lower(params, ids).compile())
    assert seen["hidden"].spec[0] != ("data", "fsdp")   # what the pins fix
    print(f"per device: pinned {ours['flops']:.3g} flops / {ours['bytes accessed']:.3g} B, plain jit "
          f"{plain['flops']:.3g} / {plain['bytes accessed']:.3g}, one device {flops_one:.3g} flops")
    assert plain["flops"] > ours["flops"] and plain["bytes accessed"] > 1.5 * ours["bytes accessed"]
