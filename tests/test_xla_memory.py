"""experiments/bench/xla_memory.py: XLA's memory analysis of the compiled PPO-Lag rollout and update (abstract
inputs, 8 fake devices, a tiny model) is consistent with the state's shardings, and safejax.memory_table's
state entries equal what the stage's own state builder holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from safejax import memory_table as mt
from safejax.parallel import MeshConfig, make_mesh

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "xla_memory.py"
# XLA's argument/alias bytes are the sums of its buffers' sizes; the state's per-device bytes are the sums of
# shard_shape x itemsize.  On the CPU backend both count dense shards without padding, so they agree to the byte;
# 1% leaves room for a backend that pads small buffers (the scalars: step, rng, the Lagrange state).
TOL = 0.01


def _script():
    spec = importlib.util.spec_from_file_location("xla_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    xm = _script()
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    cfg = xm.stage_config(8, rows_per_device=1, rollout_rows_per_device=2, seq_len=24, prompt_width=8, remat=True,
                          scan_layers=True)
    mcfg = xm.model_config(cfg, xm.TINY.replace(vocab_size=128, max_position_embeddings=32), 2)
    return xm, cfg, mcfg, xm.measure(cfg, mcfg, mesh)


def _state_total(r) -> int:
    s = r["state"]
    return sum(v["params"] + v["optimizer"] for k, v in s.items() if k != "other") + s["other"]


def test_update_arguments_and_aliases_are_the_sharded_state(tiny):
    xm, _, _, r = tiny
    up, state = r["update"], _state_total(r)
    assert up["argument"] == pytest.approx(state + r["experience"], rel=TOL)
    # the state is donated: every byte of it is reused for the new state
    assert up["alias"] == pytest.approx(state, rel=TOL)
    assert up["output"] >= up["alias"]
    # the rollout reads the params but not the optimizer states (jit prunes unused arguments)
    ro = r["rollout"]
    assert r["prompts"] == 2 * 2 * 8 * 4  # ids + mask, [16 rows / 8 devices, 8] int32
    params = sum(v["params"] for k, v in r["state"].items() if k != "other")
    assert ro["argument"] == pytest.approx(params + sum(r["frozen"].values()) + r["prompts"], rel=TOL)
    assert ro["alias"] == 0
    assert xm.peaks(r)["rollout"] == xm.resident(r) + r["prompts"] + ro["output"] + ro["temp"]


def test_memory_table_state_entries_equal_the_stage_state(tiny):
    """The table builds its optimizers with make_optimizer; the stage's state comes from ppo_state with
    make_accumulating_optimizer and the HF weight-decay groups: their per-device bytes must be equal."""
    xm, cfg, mcfg, r = tiny
    model = mt.safe_rlhf_memory("v5p-16", mcfg, rows_per_device=1, rollout_rows_per_device=2, seq_len=24)
    rows = {name: (meas, mod) for name, meas, mod in xm.compare(r, model)}
    for name, (meas, mod) in rows.items():
        if "params" in name or "Adam" in name:
            assert meas == mod and meas > 0, name
    # the rollout's temporaries hold at least the KV cache the table models
    kv = mt.rollout_bytes_estimate(mcfg, 2, 24) - 2 * 4 * 2 * 24 * mcfg.vocab_size
    assert r["rollout"]["temp"] >= kv > 0


def test_extrapolation_is_exact_for_linear_numbers():
    xm = _script()
    a, b = {"x": {"y": 10}}, {"x": {"y": 16}}
    assert xm.extrapolate(a, 2, b, 4, 32) == {"x": {"y": 10 + 30 * 3}}


def test_bad_slice_and_bad_lora_rank_are_one_line_errors(capsys):
    xm = _script()
    assert xm.main(["--tiny", "--slice", "v9-8"]) == 2
    assert "v9-8" in capsys.readouterr().err
    assert xm.main(["--tiny", "--slice", "v4-8", "--lora-rank", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lora.actor.rank" in err and "\n" not in err


def test_lora_config_keys_are_the_stage_keys():
    cfg = _script().stage_config(8, rows_per_device=1, rollout_rows_per_device=2, seq_len=24, prompt_width=8,
                                 remat=True, scan_layers=True, lora_rank=4)
    for role in ("actor", "reward_critic", "cost_critic"):
        lc = getattr(cfg.lora, role)
        assert (lc.rank, lc.alpha) == (4, 8.0) and lc.targets == ["q_proj", "k_proj", "v_proj", "o_proj"], role


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    xm, _, mcfg, _ = tiny
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    cfg = xm.stage_config(8, rows_per_device=1, rollout_rows_per_device=2, seq_len=24, prompt_width=8, remat=True,
                          scan_layers=True, lora_rank=4)
    return cfg, xm.measure(cfg, mcfg, mesh)


def test_lora_update_arguments_are_adapters_heads_experience_and_three_bases(tiny, tiny_lora):
    """With LoRA the update reads the trained adapters + heads + their optimizer state, the experience and the
    three frozen base sets, each once: the frozen bytes are those of full fine-tuning's reference + reward +
    cost models (the reference is the actor's base, the critics' backbones the score models: no second copy),
    and the trained state is a small fraction of full fine-tuning's."""
    xm, _, _, full = tiny
    _, r = tiny_lora
    up, state, frozen = r["update"], _state_total(r), sum(r["frozen"].values())
    assert r["lora"] and not full["lora"]
    assert frozen == sum(full["frozen"].values()) > 0
    assert r["experience"] == full["experience"]
    assert up["argument"] == pytest.approx(state + r["experience"] + frozen, rel=TOL)
    assert up["alias"] == pytest.approx(state, rel=TOL)  # only the trained state is donated, not the bases
    # the trained state: adapters + heads (+ Adam), far below the full models' params + Adam
    assert 0 < state < _state_total(full) / 2
    assert up["argument"] < _state_total(full) + full["experience"]
    # the rollout reads three weight sets (frozen bases) + the adapters, not six models
    params = sum(v["params"] for k, v in r["state"].items() if k != "other")
    assert r["rollout"]["argument"] == pytest.approx(params + frozen + r["prompts"], rel=TOL)
    assert xm.peaks(r)["update"] == up["argument"] + up["output"] - up["alias"] + up["temp"]


def test_memory_table_lora_state_entries_equal_the_lora_stage_state(tiny, tiny_lora):
    xm, _, mcfg, _ = tiny
    _, r = tiny_lora
    model = mt.safe_rlhf_memory("v5p-16", mcfg, rows_per_device=1, rollout_rows_per_device=2, seq_len=24,
                                lora_rank=4)
    full = mt.safe_rlhf_memory("v5p-16", mcfg, rows_per_device=1, rollout_rows_per_device=2, seq_len=24)
    for name, meas, mod in xm.compare(r, model):
        if "params" in name or "Adam" in name:
            assert meas == mod and meas > 0, name
    by, fby = {m.role: m for m in model.models}, {m.role: m for m in full.models}
    assert by["reference"].params == fby["actor"].params  # the actor's base, in the actor's dtype
    assert 0 < sum(by[k].grads for k in by) < sum(fby[k].grads for k in fby) / 2  # rank 4 on hidden 64


def test_fsdp_gather_term_is_the_embedding_head_and_one_layer_of_the_abstract_model():
    """memory_table.fsdp_gather_bytes, from the config's dimensions, against the abstract CausalLM's leaves."""
    cfg = mt.LLAMA2_7B.replace(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                               num_kv_heads=2)
    _, p = mt.abstract_model(cfg, "causal_lm")
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    whole = size(p["lm_head"]) + size(p["model"]["embed_tokens"]) + size(p["model"]["layers"][0])
    assert mt.fsdp_gather_bytes(cfg, 8) == 2 * whole  # gathered in the compute dtype (bfloat16)
    assert mt.fsdp_gather_bytes(cfg.replace(dtype="float32"), 8) == 4 * whole
    assert mt.fsdp_gather_bytes(cfg, 1) == 0
