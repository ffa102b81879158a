"""The memory table: per-device bytes computed on an abstract mesh equal what real sharded arrays hold,
and the Llama-2-7B numbers follow from the parameter count and the FSDP split."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from safejax import memory_table as mt
from safejax.models import CausalLM, ModelConfig, ScoreModel
from safejax.parallel import MeshConfig, make_mesh, opt_state_shardings, use_mesh
from safejax.models.functional import split_model
from safejax.train.optim import OptimConfig, make_optimizer

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   dtype="bfloat16")


def _max_device_bytes(tree) -> int:
    """Largest number of bytes any one device holds of real (sharded) arrays."""
    per_dev: dict = {}
    for x in jax.tree.leaves(tree):
        for sh in x.addressable_shards:
            per_dev[sh.device] = per_dev.get(sh.device, 0) + sh.data.nbytes
    return max(per_dev.values())


@pytest.mark.parametrize("kind", ["causal_lm", "score"])
def test_abstract_per_device_bytes_equal_real_sharded_arrays(kind):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    tx = make_optimizer(OptimConfig(weight_decay=0.01), 10)[0]
    with use_mesh(mesh):
        model = (CausalLM if kind == "causal_lm" else ScoreModel)(TINY, rngs=nnx.Rngs(0))
    mdef, params = split_model(model)
    shardings = mdef.shardings(mesh)
    params = jax.tree.map(jax.device_put, params, shardings)
    opt = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, shardings, mesh))(params)

    role = "actor" if kind == "causal_lm" else "reward_critic"
    got = mt.model_memory(role, TINY, mt.abstract_mesh((1, 4, 2)), trainable=True, tx=tx)
    assert got.params == _max_device_bytes(params)
    assert got.optimizer == _max_device_bytes(opt)
    assert got.grads == got.params
    assert got.num_params == sum(x.size for x in jax.tree.leaves(params))
    # the split is real: one device holds less than the whole model
    assert got.params < sum(x.nbytes for x in jax.tree.leaves(params))


def test_llama2_7b_fsdp16_bytes_follow_from_the_parameter_count():
    t = mt.safe_rlhf_memory("v4-32")
    by = {m.role: m for m in t.models}
    n_actor = 6_738_415_616                       # Llama-2-7B
    n_score = n_actor - 32000 * 4096 + 4096 + 1   # no lm_head; score head [D, 1] + bias
    assert by["actor"].num_params == by["reference"].num_params == n_actor
    assert by["reward_critic"].num_params == by["cost_model"].num_params == n_score
    assert t.mesh_shape == {"data": 1, "fsdp": 16, "tensor": 1}
    norms = (2 * 32 + 1) * 4096                   # RMSNorm scales stay replicated
    assert by["actor"].params == (n_actor - norms) * 4 // 16 + norms * 4
    assert by["reward_model"].params == (n_score - norms - 1) * 4 // 16 + (norms + 1) * 4
    # AdamW: two fp32 moments per parameter, sharded like it (+ a few replicated counters)
    assert 0 <= by["actor"].optimizer - 2 * by["actor"].params < 64
    assert by["reference"].grads == by["reference"].optimizer == 0
    assert t.states == sum(m.params + m.grads + m.optimizer for m in t.models)
    assert t.verdict == "tight"  # 96%: measured by XLA for a TPU, 92% (tpu_setup/README.md)


def test_bf16_frozen_models_halve_their_bytes_and_small_slices_do_not_fit():
    f32 = mt.safe_rlhf_memory("v5e-16")
    bf16 = mt.safe_rlhf_memory("v5e-16", frozen_param_dtype="bfloat16")
    for a, b in zip(f32.models, bf16.models):
        if a.trainable:
            assert a.total == b.total
        else:
            assert abs(b.params - a.params / 2) <= 65 * 4096 * 2
    assert f32.verdict == "no"        # 16 GiB chips cannot hold six fp32 7B models over 16 chips
    wide = mt.safe_rlhf_memory("v5e-64")
    assert wide.states * 4 == pytest.approx(f32.states, rel=0.01)


def test_tensor_axis_changes_the_split_but_not_the_per_device_total_when_all_dims_divide():
    a = mt.safe_rlhf_memory("v5p-16")
    b = mt.safe_rlhf_memory("v5p-16", mesh=MeshConfig(data=1, fsdp=-1, tensor=2))
    assert b.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 2}
    assert a.models[0].params == b.models[0].params


@pytest.mark.parametrize("name,chips,hosts,hbm_gib", [
    ("v4-8", 4, 1, 32), ("v4-32", 16, 4, 32), ("v5p-16", 8, 2, 95), ("v5e-16", 16, 4, 16),
    ("v5litepod-8", 8, 1, 16), ("v6e-16", 16, 4, 32),
])
def test_slice_spec_matches_tpu_setup_hosts_table(name, chips, hosts, hbm_gib):
    s = mt.slice_spec(name)
    assert (s.chips, s.hosts, s.hbm_bytes) == (chips, hosts, hbm_gib * 1024 ** 3)


@pytest.mark.parametrize("bad", ["v4-12", "v5e-12", "tpu-8", "v4"])
def test_unknown_accelerator_type_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=bad):
        mt.slice_spec(bad)


def test_cli_prints_one_markdown_row_per_slice(capsys):
    assert mt.main(["--accelerator-type", "v4-32", "--accelerator-type", "v5e-16", "--detail"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| v")]
    assert [r.split("|")[1].strip() for r in rows] == ["v4-32", "v5e-16"]
    assert rows[0].rstrip().endswith("| tight |") and rows[1].rstrip().endswith("| **no** |")
    assert "| actor | yes | 6,738,415,616 | float32 | 1.57 | 1.57 | 3.14 | 6.28 |" in out
    assert mt.main(["--accelerator-type", "v9-8"]) == 2
    assert "v9-8" in capsys.readouterr().err


def test_critic_free_and_offline_setups_hold_their_models_only():
    full = mt.safe_rlhf_memory("v4-32")
    by = {m.role: m for m in full.models}
    free = mt.safe_rlhf_memory("v4-32", setup="critic_free")
    off = mt.safe_rlhf_memory("v4-32", setup="offline")
    assert [m.role for m in free.models] == ["actor", "reference", "reward_model", "cost_model"]
    assert free.states == full.states - by["reward_critic"].total - by["cost_critic"].total
    assert off.states == by["actor"].total + by["reference"].total
    assert off.rollout_working_set == 0 and free.rollout_working_set == full.rollout_working_set
    assert "| - | - |" in mt.to_markdown([off])


def test_lora_rows_hold_three_frozen_bases_and_adapter_sized_trained_state():
    """LoRA at 7B: the trained rows are the q/k/v/o adapters (L x 4 x r x (in + out) params; a critic + its
    [D, 1] head), the frozen rows the same bytes as full fine-tuning's reference + reward + cost models, and
    the update's working set loses the whole gradients and the 7B optimizer carry but gains a bf16 copy of the
    three fp32 bases."""
    cfg, r = mt.LLAMA2_7B, 16
    full = mt.safe_rlhf_memory("v4-32", lora_rank=0)
    lora = mt.safe_rlhf_memory("v4-32", lora_rank=r)
    by, fby = {m.role: m for m in lora.models}, {m.role: m for m in full.models}
    adapters = cfg.num_layers * 4 * r * (cfg.hidden_size + cfg.hidden_size)  # 32 heads x 128 = hidden
    assert by["actor"].num_params == adapters
    assert by["reward_critic"].num_params == by["cost_critic"].num_params == adapters + cfg.hidden_size + 1
    frozen = ("reference", "reward_model", "cost_model")
    assert [by[k].params for k in frozen] == [fby[k].params for k in frozen]
    assert all(by[k].grads == by[k].optimizer == 0 for k in frozen)
    for k in ("actor", "reward_critic", "cost_critic"):
        m = by[k]
        assert m.trainable and m.grads == m.params and 2 * m.params <= m.optimizer < fby[k].params / 10
    whole_grads = mt.fsdp_gather_bytes(cfg.replace(dtype="float32"), 16)
    carry = lambda t: sum(m.params for m in t.models if m.trainable)  # noqa: E731
    base_cast = sum(by[k].params for k in frozen) // 2
    assert lora.update_activations == full.update_activations - whole_grads - carry(full) + carry(lora) + base_cast
    assert lora.rollout_working_set == full.rollout_working_set
    assert lora.total < full.total / 2
    # bf16 frozen reward/cost models: only the reference (the actor's fp32 base) is cast, and it keeps fp32
    half = mt.safe_rlhf_memory("v4-32", lora_rank=r, frozen_param_dtype="bfloat16")
    hby = {m.role: m for m in half.models}
    assert hby["reference"].params == by["reference"].params and hby["reward_model"].params < by["reward_model"].params
    # (the critics' adapters and heads take their base's dtype: a smaller optimizer carry too)
    assert half.update_activations == (lora.update_activations - (by["reward_model"].params
                                                                   + by["cost_model"].params) // 2
                                       - carry(lora) + carry(half))
