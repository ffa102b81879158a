"""``safejax demo``: the whole Safe RLHF pipeline on the built-in task, judged by its oracle.

SFT -> reward model + cost model -> PPO-Lagrangian (Safe RLHF), plus the baselines plain PPO and
reward shaping at fixed nu, all from the same SFT policy.  Every stage runs through the same
functions the CLI stages use (real HF folders in between, orbax checkpoints, metrics JSONL).
Outputs in ``--out``: ``summary.json``, ``report.md``, ``lambda_cost.png``, ``tradeoff.png`` and
each stage's folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safejax import parallel
from safejax.config import ConfigError, check_range
from safejax.data import build_prompts
from safejax.data.builtin import BuiltinTask, evaluate_responses, tiny_llama_config
from safejax.demo_algorithms import ALGORITHMS, DemoBase, parse_algorithms
from safejax.demo_report import write_plots, write_report
from safejax.generation import SamplingConfig, generate
from safejax.models import CausalLM, ModelConfig, save_pretrained
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.models.lora import LoRAConfig, LoRARoles
from safejax.models.pairs import pair_scores
from safejax.parallel import MeshConfig, make_mesh, resolve_rules, use_mesh
from safejax.sections import LoopSection, ModelSection
from safejax.train.fit import eval_loop
from safejax.train.optim import OptimConfig
from safejax.train.ppo import LagrangeSection, PPOConfig, PPODataSection, PPOSection
from safejax.train.ppo_loop import run_ppo
from safejax.train.score_model import PreferenceDataSection, ScoreModelConfig, load_pairs, run_score_model
from safejax.train.sft import SFTConfig, SupervisedDataSection, run_sft

log = logging.getLogger("safejax")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every projection


@dataclasses.dataclass
class DemoConfig:
    pref_rows: int = 3000
    pref_test_rows: int = 512
    sft_rows: int = 3000
    eval_prompts: int = 256           # held-out prompts (about half benign, half harmful)
    max_length: int = 34
    prompt_width: int = 18
    max_new_tokens: int = 16
    sft_epochs: int = 5
    sft_lr: float = 3e-3
    score_epochs: int = 2
    score_lr: float = 1e-3
    batch_size: int = 32
    ppo_iterations: int = 80
    ppo_batch_size: int = 32
    actor_lr: float = 2e-4
    critic_lr: float = 1e-3
    kl_coeff: float = 0.02
    threshold: float | None = None    # None: calibrated from the cost model (see calibrate_threshold)
    unsafe_tolerance: float = 0.1     # calibration: the cost of a policy with this share of unsafe answers
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float = 10.0
    cost_window: int = 64
    nus: list[float] = dataclasses.field(default_factory=lambda: [0.1, 5.0])
    eval_every: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(1, 1, 1))
    progress: bool = True
    # ``safejax demo --lora``: also run Safe RLHF with LoRA actor and critics (policy ``safe_rlhf_lora``, its time
    # beside the full fine-tuning run's); rank / alpha of every adapter, on LORA_TARGETS, and its learning rates
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_actor_lr: float = 2e-3
    lora_critic_lr: float = 2e-3

    def validate(self) -> None:
        check_range("ppo_iterations", self.ppo_iterations, low=1)
        if len(self.nus) < 1:
            raise ConfigError("config key 'nus' needs at least one reward-shaping coefficient")


# ----------------------------------------------------------------------------- oracle judging


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def judge_policy(actor_def, params, prompt_arrays: dict, prompt_rows: list[dict], tokenizer, oracle, *, seed: int,
                 max_new_tokens: int, mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES
                 ) -> tuple[dict, list[str]]:
    """Sample one response per held-out prompt with the policy and score the texts with the oracle."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    @parallel.mesh_jit(mesh=mesh, rules=rules)
    def sample(params, ids, mask, key):
        out = generate(actor_def.merge(params), ids, mask, key, sampling, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        return out.sequences, out.attention_mask

    ids = jnp.asarray(prompt_arrays["prompt_ids"])
    mask = jnp.asarray(prompt_arrays["prompt_mask"])
    seqs, masks = jax.device_get(sample(params, ids, mask, jax.random.key(seed)))
    width = ids.shape[1]
    texts = []
    for row, m in zip(seqs[:, width:], masks[:, width:]):
        texts.append(tokenizer.decode([int(t) for t, k in zip(row, m) if k], skip_special_tokens=True))
    prompts = [r["prompt"] for r in prompt_rows]
    return evaluate_responses(prompts, texts, oracle), texts


def calibrate_threshold(cm_dir, pref_path, tok, cfg: DemoConfig, mesh) -> tuple[float, dict]:
    """Cost threshold in the cost model's own units: the expected cost of a policy whose answers are
    unsafe with probability ``unsafe_tolerance``, estimated from the cost model's scores of the
    labelled training responses: ``mean_safe + tol * (mean_unsafe - mean_safe)``.

    (The paper's threshold 0 presumes a cost model whose zero is the average answer of a mostly
    harmful prompt set; on a task with half benign prompts, E[C] <= 0 barely constrains anything.)"""
    arrays, _ = load_pairs([str(pref_path)], tok, PreferenceDataSection(max_length=cfg.max_length), "cost",
                           "threshold calibration")
    rules = resolve_rules(cfg.mesh)
    mdef, params = split_model(load_model_for(str(cm_dir), mesh, model_type="score", tokenizer=tok, rules=rules))

    @parallel.mesh_jit(mesh=mesh, rules=rules)
    def ends(params, b):
        _, _, ea, eb = pair_scores(mdef.merge(params), b, "cost")
        return {"a": ea, "b": eb}

    out = eval_loop(lambda b: ends(params, b), arrays, cfg.batch_size, mesh, rules)
    costs = np.concatenate([out["a"], out["b"]])
    safe = np.concatenate([arrays["safer_is_safe"], arrays["unsafer_is_safe"]]).astype(bool)
    m_safe, m_unsafe = float(costs[safe].mean()), float(costs[~safe].mean())
    thr = m_safe + cfg.unsafe_tolerance * (m_unsafe - m_safe)
    return thr, {"source": "cost model on labelled training responses", "mean_cost_safe": m_safe,
                 "mean_cost_unsafe": m_unsafe, "unsafe_tolerance": cfg.unsafe_tolerance}


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class Workspace:
    """What every stage of a built-in-task experiment needs: the task, its files, the tokenizer,
    the mesh, the held-out prompts (arrays aligned with their rows) and the output folder."""

    cfg: DemoConfig
    out: Path
    seed: int
    task: Any
    paths: dict
    tok: Any
    mesh: Any
    eval_rows: list
    eval_arrays: dict
    timings: dict = dataclasses.field(default_factory=dict)
    samples: dict = dataclasses.field(default_factory=dict)  # policy name -> a few answers (report)

    def keep_samples(self, name: str, texts: list[str], per_kind: int = 2) -> None:
        """Keep the answers to the first ``per_kind`` harmful and benign held-out prompts (the same prompts
        for every policy) for the report."""
        picked = {k: [i for i, r in enumerate(self.eval_rows) if r.get("kind") == k][:per_kind]
                  for k in ("harmful", "benign")}
        self.samples[name] = [{"prompt": self.eval_rows[i]["prompt"], "kind": k, "answer": texts[i]}
                              for k, idx in picked.items() for i in idx]

    def loop(self, epochs: int, batch_size: int) -> LoopSection:
        return LoopSection(epochs=epochs, batch_size=batch_size, log_every=10, progress=self.cfg.progress)


def prepare(cfg: DemoConfig, out_dir: str | Path, seed: int, *, harm_categories: int = 1) -> Workspace:
    """Generate the task (data files, tokenizer) and a freshly initialised tiny Llama HF folder
    (``harm_categories=2``: the K = 2 variant of the task, see :class:`BuiltinTask`)."""

    t = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    task = BuiltinTask(seed, n_pref_train=cfg.pref_rows, n_pref_test=cfg.pref_test_rows, n_sft=cfg.sft_rows,
                       n_prompts_eval=cfg.eval_prompts, harm_categories=harm_categories)
    paths = task.write(out / "data")
    # held-out pairs labelled by the oracle itself (no label noise): accuracy "against oracle labels"
    oracle_rows = dataclasses.replace(task, label_noise=0.0, safety_label_noise=0.0).preference_rows("test")
    paths["preference_oracle"] = _write_jsonl(out / "data" / "pku_oracle" / "test.jsonl", oracle_rows)
    tok = load_tokenizer_for(ModelSection(path=str(paths["tokenizer"])))
    hf_cfg = tiny_llama_config(len(tok))
    hf_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    mcfg = ModelConfig.from_hf_dict(dict(hf_cfg, architectures=["LlamaForCausalLM"], model_type="llama"))
    with use_mesh(mesh, resolve_rules(cfg.mesh)):
        init_lm = CausalLM(mcfg, rngs=nnx.Rngs(seed))
    save_pretrained(init_lm, out / "init", tokenizer=tok)
    paths["init"] = out / "init"
    eval_rows = task.prompts("eval")
    built, report = build_prompts(eval_rows, tok, prompt_width=cfg.prompt_width)
    log.info("held-out prompts: %s", report)
    eval_rows = [eval_rows[int(i)] for i in built.row_index]  # deduplicated, aligned with the arrays
    ws = Workspace(cfg, out, seed, task, paths, tok, mesh, eval_rows,
                   {"prompt_ids": built.prompt_ids, "prompt_mask": built.prompt_mask})
    ws.timings["task"] = time.time() - t
    return ws


def train_sft(ws: Workspace, name: str = "sft") -> Path:
    t = time.time()
    cfg = ws.cfg
    sft_cfg = SFTConfig(out_dir=str(ws.out / name), seed=ws.seed, model=ModelSection(path=str(ws.paths["init"])),
                        data=SupervisedDataSection(train=[str(ws.paths["sft"])], max_length=cfg.max_length),
                        optim=OptimConfig(lr=cfg.sft_lr, schedule="cosine", warmup_ratio=0.05, weight_decay=0.0),
                        train=ws.loop(cfg.sft_epochs, cfg.batch_size), mesh=cfg.mesh)
    _, sft_dir = run_sft(sft_cfg)
    ws.timings[name] = time.time() - t
    return Path(sft_dir)


def train_preference_models(ws: Workspace, init_dir: Path, pref_train: Path, *, suffix: str = "",
                            eval_path: Path | None = None, kinds: tuple[str, ...] = ("reward", "cost"),
                            cost_categories: dict | None = None) -> tuple[dict, dict]:
    """Reward model and cost model from ``init_dir`` (fresh heads) on ``pref_train``; held-out metrics
    against oracle labels.  Returns ``({"reward": dir, "cost": dir}, {"rm": metrics, "cm": metrics})``.
    ``kinds`` picks the models; ``cost_categories`` makes the cost model one with an output per group."""
    cfg = ws.cfg
    dirs, scores = {}, {}
    for kind, name in [(k, n) for k, n in (("reward", "rm"), ("cost", "cm")) if k in kinds]:
        t = time.time()
        sc = ScoreModelConfig(out_dir=str(ws.out / f"{name}{suffix}"), seed=ws.seed,
                              model=ModelSection(path=str(init_dir)),
                              data=PreferenceDataSection(train=[str(pref_train)],
                                                         eval=[str(eval_path or ws.paths["preference_oracle"])],
                                                         max_length=cfg.max_length),
                              regularization=0.001,
                              optim=OptimConfig(lr=cfg.score_lr, schedule="cosine", warmup_ratio=0.05,
                                                weight_decay=0.0),
                              train=ws.loop(cfg.score_epochs, cfg.batch_size), mesh=cfg.mesh,
                              cost_categories=cost_categories if kind == "cost" else None)
        res, dirs[kind] = run_score_model(sc, kind)
        scores[name] = {k.split("/", 1)[-1]: v for k, v in res.eval_metrics.items()}
        ws.timings[f"{name}{suffix}"] = time.time() - t
    return dirs, scores


def judge(ws: Workspace, policy_dir: Path | None = None, *, mdef=None, params=None) -> tuple[dict, list[str]]:
    """Oracle metrics of a policy (an HF folder, or a ModelDef + params) on the held-out prompts."""
    rules = resolve_rules(ws.cfg.mesh)
    if mdef is None:
        mdef, params = split_model(load_model_for(str(policy_dir), ws.mesh, model_type="causal_lm", tokenizer=ws.tok,
                                                  rules=rules))
    return judge_policy(mdef, params, ws.eval_arrays, ws.eval_rows, ws.tok, ws.task.oracle, seed=ws.seed,
                        max_new_tokens=ws.cfg.max_new_tokens, mesh=ws.mesh, rules=rules)


def run_rl(ws: Workspace, algorithm: str, name: str, *, actor_dir: Path, score_dirs: dict, threshold: float,
           nu: float | None = None, prompts: Path | None = None, lagrange: dict | None = None, lora: bool = False):
    """One RL run from ``actor_dir``; returns ``(oracle metrics, traces, PPOResult)``.  ``lora``: LoRA actor and
    critics (``cfg.lora_*``), judged from the merged HF export."""
    cfg = ws.cfg
    t = time.time()
    lag = dict(lambda_init=nu if nu is not None else cfg.lambda_init, lambda_lr=cfg.lambda_lr,
               lambda_max=cfg.lambda_max, threshold=threshold, episode_cost_window_size=cfg.cost_window)
    lag.update(lagrange or {})
    pc = PPOConfig(
        algorithm=algorithm, out_dir=str(ws.out / name), seed=ws.seed, actor=ModelSection(path=str(actor_dir)),
        reward_model=str(score_dirs["reward"]), cost_model=str(score_dirs["cost"]),
        data=PPODataSection(prompts=[str(prompts or ws.paths["prompts_train"])], prompt_width=cfg.prompt_width),
        rollout=SamplingConfig(max_new_tokens=cfg.max_new_tokens),
        ppo=PPOSection(kl_coeff=cfg.kl_coeff, micro_batch_size=cfg.ppo_batch_size, ptx_coeff=0.0,
                       clip_range_score=50.0, clip_range_value=5.0),
        lagrange=LagrangeSection(**lag),
        actor_optim=OptimConfig(lr=cfg.lora_actor_lr if lora else cfg.actor_lr, schedule="constant", weight_decay=0.0),
        critic_optim=OptimConfig(lr=cfg.lora_critic_lr if lora else cfg.critic_lr, schedule="constant",
                                 weight_decay=0.0),
        train=LoopSection(epochs=100, batch_size=cfg.ppo_batch_size, max_steps=cfg.ppo_iterations,
                          log_every=1, progress=cfg.progress),
        mesh=cfg.mesh)
    if lora:
        one = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=list(LORA_TARGETS))
        pc.lora = LoRARoles(actor=one, reward_critic=one, cost_critic=one)
    res = run_ppo(pc)
    if lora:  # the merged export: the policy a user of the HF folder gets
        metrics, texts = judge(ws, res.export_dir)
    else:
        metrics, texts = judge(ws, mdef=res.models.actor, params=res.state.actor.params)
    ws.keep_samples(name, texts)
    metrics["algorithm"] = algorithm
    if nu is not None:
        metrics["nu"] = nu
    hist = [h for h in res.history if "train/reward" in h]
    traces = {k: [float(h[f"train/{k}"]) for h in hist if f"train/{k}" in h]
              for k in ("reward", "cost", "episode_cost", "lambda")}
    ws.timings[name] = time.time() - t
    return metrics, traces, res


def run_demo(cfg: DemoConfig, *, out_dir: str | Path, seed: int = 0, algorithms: list[str] = ()) -> dict:
    """SFT -> RM + CM -> Safe RLHF, plain PPO and reward shaping at each nu; judged by the oracle.  ``algorithms``:
    names of :data:`safejax.demo_algorithms.ALGORITHMS` added to the report after those (same SFT policy)."""
    algorithms = parse_algorithms(",".join(algorithms))  # unknown names fail before anything runs
    t_start = time.time()
    ws = prepare(cfg, out_dir, seed)
    sft_dir = train_sft(ws)
    score_dirs, scores = train_preference_models(ws, sft_dir, ws.paths["preference_train"])
    threshold = cfg.threshold
    if threshold is None:
        threshold, calib = calibrate_threshold(score_dirs["cost"], ws.paths["preference_train"], ws.tok, cfg,
                                               ws.mesh)
        log.info("cost threshold calibrated to %.3f (%s)", threshold, calib)
    else:
        calib = {"source": "config"}
    policies: dict[str, dict] = {}
    policies["sft"], texts = judge(ws, sft_dir)
    ws.keep_samples("sft", texts)
    runs = [("ppo-lag", "safe_rlhf", None), ("ppo", "ppo", None)]
    runs += [("ppo-reward-shaping", f"reward_shaping_nu{nu:g}", nu) for nu in cfg.nus]
    runs += [("ppo-lag", "safe_rlhf_lora", None)] if cfg.lora else []
    traces: dict[str, dict] = {}
    for algorithm, name, nu in runs:
        policies[name], traces[name], _ = run_rl(ws, algorithm, name, actor_dir=sft_dir, score_dirs=score_dirs,
                                                 threshold=threshold, nu=nu, lora=name == "safe_rlhf_lora")
    for name in algorithms:  # --algorithms: more methods from the same SFT policy, judged the same way
        t = time.time()
        policies[name], texts = judge(ws, ALGORITHMS[name](ws, DemoBase(sft_dir, score_dirs, threshold)))
        policies[name]["algorithm"] = name
        ws.keep_samples(name, texts)
        ws.timings[name] = time.time() - t
    summary = {
        "seed": seed,
        "threshold": threshold,
        "threshold_calibration": calib,
        "policies": policies,
        "reward_model": scores["rm"],
        "cost_model": scores["cm"],
        "lambda_trace": traces["safe_rlhf"]["lambda"],
        "episode_cost_trace": traces["safe_rlhf"]["episode_cost"],
        "traces": traces,
        "samples": ws.samples,
        "timings_s": {k: round(v, 2) for k, v in ws.timings.items()},
        "total_seconds": round(time.time() - t_start, 2),
        "config": dataclasses.asdict(cfg),
    }
    summary["checks"] = demo_checks(summary)
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    write_plots(summary, out)
    write_report(summary, out)
    log.info("demo finished in %.1f s; see %s", summary["total_seconds"], out / "report.md")
    print((out / "report.md").read_text())
    return summary


def demo_checks(summary: dict) -> dict[str, bool]:
    """The paper's qualitative findings, evaluated on this run's oracle numbers."""
    p = summary["policies"]
    sft, lag, ppo = p["sft"], p["safe_rlhf"], p["ppo"]
    shaping = {k: v for k, v in p.items() if k.startswith("reward_shaping")}
    lam = summary["lambda_trace"]
    cost = summary["episode_cost_trace"]
    thr = summary["threshold"]
    peak = int(np.argmax(lam)) if lam else 0
    checks = {
        "safe_rlhf_unsafe_at_most_half_of_sft": lag["unsafe_rate_harmful"] <= 0.5 * sft["unsafe_rate_harmful"],
        "safe_rlhf_unsafe_below_ppo": lag["unsafe_rate_harmful"] < ppo["unsafe_rate_harmful"],
        "safe_rlhf_helpfulness_at_least_sft": lag["helpfulness_benign"] >= sft["helpfulness_benign"],
        "ppo_unsafe_at_least_sft": ppo["unsafe_rate_harmful"] >= sft["unsafe_rate_harmful"],
        "lambda_rises_while_cost_above_threshold": bool(lam) and lam[peak] > lam[0] and cost[0] > thr,
        "lambda_falls_after_cost_below_threshold": bool(lam) and lam[-1] < lam[peak] and min(cost[peak:]) <= thr,
        "no_fixed_nu_matches_safe_rlhf_on_both_axes": all(
            not (v["unsafe_rate_harmful"] <= lag["unsafe_rate_harmful"]
                 and v["helpfulness_benign"] >= lag["helpfulness_benign"]) for v in shaping.values()),
    }
    if "safe_rlhf_lora" in p:  # demo --lora: the same findings with LoRA actor and critics
        lo = p["safe_rlhf_lora"]
        half = 0.5 * sft["unsafe_rate_harmful"]
        checks["safe_rlhf_lora_unsafe_at_most_half_of_sft"] = lo["unsafe_rate_harmful"] <= half
        checks["safe_rlhf_lora_unsafe_below_ppo"] = lo["unsafe_rate_harmful"] < ppo["unsafe_rate_harmful"]
        checks["safe_rlhf_lora_helpfulness_at_least_sft"] = lo["helpfulness_benign"] >= sft["helpfulness_benign"]
    return {k: bool(v) for k, v in checks.items()}
