"""Cloud TPU (and GPU) slice shapes: chips, hosts and HBM per chip of an accelerator type.

Standard library only, so that any module (the multi-host start-up, the memory planner, the TPU
setup scripts' tests) can read it without pulling in JAX or the models.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """One accelerator slice: ``chips`` JAX devices on ``hosts`` processes, ``hbm_bytes`` per chip."""

    name: str
    generation: str
    chips: int
    hosts: int
    hbm_bytes: int


def slice_spec(accelerator_type: str) -> SliceSpec:
    """Chips, hosts and HBM of a Cloud TPU accelerator type (same rules as ``tpu_setup/hosts.sh``).

    ``v4-N`` / ``v5p-N`` count TensorCores (2 per chip = one JAX device, 4 chips per host);
    ``v5litepod-N`` (alias ``v5e-N``) and ``v6e-N`` count chips (one VM up to 8 chips, 4-chip VMs
    above).  Also accepted for comparison: ``h100-N`` / ``a100-N`` (N GPUs of 80 GB, 8 per host)."""
    raw = accelerator_type.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e|h100|a100)-(\d+)", raw)
    if not m:
        raise ValueError(f"accelerator type '{accelerator_type}': expected v4-N, v5p-N, v5e-N (v5litepod-N), "
                         f"v6e-N, h100-N or a100-N")
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v4", "v5p"):
        if n < 8 or n % 8:
            raise ValueError(f"accelerator type '{accelerator_type}': {gen} sizes count TensorCores (2 per chip, "
                             f"4 chips per host) and must be a multiple of 8")
        chips = n // 2
        hbm = {"v4": 32, "v5p": 95}[gen] * GiB
        return SliceSpec(f"{gen}-{n}", gen, chips, chips // 4, hbm)
    if gen in ("v5litepod", "v5e", "v6e"):
        if n not in (1, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"accelerator type '{accelerator_type}': {gen} sizes count chips and must be one of "
                             f"1, 4, 8, 16, 32, 64, 128, 256")
        gen = "v5e" if gen == "v5litepod" else gen
        hbm = {"v5e": 16, "v6e": 32}[gen] * GiB
        return SliceSpec(f"{gen}-{n}", gen, n, 1 if n <= 8 else n // 4, hbm)
    if n < 1:
        raise ValueError(f"accelerator type '{accelerator_type}': need at least one GPU")
    return SliceSpec(f"{gen}-{n}", gen, n, max(1, math.ceil(n / 8)), 80 * 10 ** 9)
