"""``safejax demo --algorithms dpo,safe_dpo,bfpo``: more methods in the demo's report.

Each named method runs after the demo's default stages, from the same SFT policy, data, reward model, cost model
and calibrated threshold, and is judged by the oracle like the others (a row in the report's policy table, a
marker in ``tradeoff.png``).  :data:`ALGORITHMS` maps a name to a runner ``(workspace, base) -> policy folder``;
add a method by adding a runner.  The default demo (no ``--algorithms``) is unchanged.

The offline methods use the settings of ``experiments/configs/tiny/{dpo,safe_dpo,bfpo}.yaml`` (:data:`OFFLINE`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from safejax.config import ConfigError
from safejax.sections import DataSection, ModelSection
from safejax.train.dpo import DPOConfig, DPOSection, run_dpo
from safejax.train.optim import OptimConfig


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


ALGORITHMS: dict[str, Callable[[Any, DemoBase], Path]] = {
    "dpo": lambda ws, base: run_offline(ws, base, "dpo"),
    "safe_dpo": lambda ws, base: run_offline(ws, base, "safe_dpo"),
    "bfpo": lambda ws, base: run_offline(ws, base, "bfpo"),
}


def parse_algorithms(text: str | None) -> list[str]:
    """``"dpo,safe_dpo"`` -> ``["dpo", "safe_dpo"]``; an unknown name is a :class:`ConfigError` listing the known
    ones (raised before anything runs)."""
    names = [n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--algorithms: unknown method(s) {unknown}; available: {', '.join(ALGORITHMS)}")
    return list(dict.fromkeys(names))
