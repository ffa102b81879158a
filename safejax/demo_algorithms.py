"""``safejax demo --algorithms dpo,safe_dpo,bfpo,grpo_lag,grpo``: more methods in the demo's report.

Each named method runs after the demo's default stages, from the same SFT policy, data, reward model, cost model
and calibrated threshold, and is judged by the oracle like the others (a row in the report's policy table, a
marker in ``tradeoff.png``).  :data:`ALGORITHMS` maps a name to a runner ``(workspace, base) -> policy folder``;
add a method by adding a runner.  The default demo (no ``--algorithms``) is unchanged.

The offline methods use the settings of ``experiments/configs/tiny/{dpo,safe_dpo,bfpo}.yaml`` (:data:`OFFLINE`), the
critic-free ones those of ``experiments/configs/tiny/{grpo_lag,grpo}.yaml`` (:data:`GROUP`) with the demo's RL
settings (iterations, KL coefficient as beta, multiplier settings and calibrated threshold).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from safejax.config import ConfigError
from safejax.generation import SamplingConfig
from safejax.sections import DataSection, LoopSection, ModelSection
from safejax.train.dpo import DPOConfig, DPOSection, run_dpo
from safejax.train.grpo import GRPOConfig, GRPOSection
from safejax.train.grpo_loop import run_grpo
from safejax.train.lagrange_stage import LagrangeSection
from safejax.train.optim import OptimConfig
from safejax.train.ppo_config import PPODataSection


@dataclasses.dataclass
class DemoBase:
    """What every added method starts from: the SFT policy folder, ``{"reward": dir, "cost": dir}`` and the
    calibrated cost threshold (in the cost model's units)."""

    sft_dir: Path
    score_dirs: dict
    threshold: float


# the tiny configs' offline settings: beta, learning rate (cosine, warmup 0.03), epochs over the preference rows
OFFLINE = {"scale_coeff": 0.1, "lr": 1e-3, "epochs": 1, "safety_margin": 0.0, "bfpo_b1": 3.0, "bfpo_alpha": 0.5}


def run_offline(ws: Any, base: DemoBase, loss: str) -> Path:
    """``safejax dpo`` with ``dpo.loss = loss`` from the demo's SFT policy on its preference rows."""
    cfg = DPOConfig(out_dir=str(ws.out / loss), seed=ws.seed, model=ModelSection(path=str(base.sft_dir)),
                    data=DataSection(train=[str(ws.paths["preference_train"])], max_length=ws.cfg.max_length),
                    dpo=DPOSection(loss=loss, scale_coeff=OFFLINE["scale_coeff"],
                                   safety_margin=OFFLINE["safety_margin"], bfpo_b1=OFFLINE["bfpo_b1"],
                                   bfpo_alpha=OFFLINE["bfpo_alpha"]),
                    optim=OptimConfig(lr=OFFLINE["lr"], schedule="cosine", warmup_ratio=0.03, weight_decay=0.0),
                    train=ws.loop(OFFLINE["epochs"], ws.cfg.batch_size), mesh=ws.cfg.mesh)
    _, export_dir = run_dpo(cfg)
    return Path(export_dir)


# the tiny GRPO configs' settings: G answers per prompt, answers per iteration (one mini-batch), actor lr
GROUP = {"group_size": 4, "batch_size": 32, "lr": 2e-4}


def run_critic_free(ws: Any, base: DemoBase, algorithm: str) -> Path:
    """``safejax grpo-lag`` / ``grpo`` from the demo's SFT policy on its RL prompts (four / three models)."""
    c = ws.cfg
    cfg = GRPOConfig(
        algorithm=algorithm, out_dir=str(ws.out / algorithm.replace("-", "_")), seed=ws.seed,
        actor=ModelSection(path=str(base.sft_dir)), reward_model=str(base.score_dirs["reward"]),
        cost_model=str(base.score_dirs["cost"]) if algorithm == "grpo-lag" else "",
        data=PPODataSection(prompts=[str(ws.paths["prompts_train"])], prompt_width=c.prompt_width),
        rollout=SamplingConfig(max_new_tokens=c.max_new_tokens, num_return_sequences=GROUP["group_size"]),
        grpo=GRPOSection(beta=c.kl_coeff, micro_batch_size=GROUP["batch_size"]),
        lagrange=LagrangeSection(threshold=base.threshold, lambda_init=c.lambda_init, lambda_lr=c.lambda_lr,
                                 lambda_max=c.lambda_max, episode_cost_window_size=c.cost_window),
        actor_optim=OptimConfig(lr=GROUP["lr"], schedule="constant", weight_decay=0.0),
        train=LoopSection(epochs=100, batch_size=GROUP["batch_size"], max_steps=c.ppo_iterations, log_every=1,
                          progress=c.progress),
        mesh=c.mesh)
    return Path(run_grpo(cfg).export_dir)


ALGORITHMS: dict[str, Callable[[Any, DemoBase], Path]] = {
    "dpo": lambda ws, base: run_offline(ws, base, "dpo"),
    "safe_dpo": lambda ws, base: run_offline(ws, base, "safe_dpo"),
    "bfpo": lambda ws, base: run_offline(ws, base, "bfpo"),
    "grpo_lag": lambda ws, base: run_critic_free(ws, base, "grpo-lag"),
    "grpo": lambda ws, base: run_critic_free(ws, base, "grpo"),
}


def parse_algorithms(text: str | None) -> list[str]:
    """``"dpo,safe_dpo"`` -> ``["dpo", "safe_dpo"]``; an unknown name is a :class:`ConfigError` listing the known
    ones (raised before anything runs)."""
    names = [n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--algorithms: unknown method(s) {unknown}; available: {', '.join(ALGORITHMS)}")
    return list(dict.fromkeys(names))
