"""Multi-process start-up: call ``jax.distributed.initialize`` when the environment describes a
multi-host run (explicit ``SAFEJAX_*`` variables, ``SAFEJAX_DISTRIBUTED=1``, or a Cloud TPU VM of a
multi-host slice)."""

from __future__ import annotations

import os

import jax

from safejax.config import ConfigError
from safejax.slices import slice_spec


def _distributed_is_initialized() -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed as _dist  # jax < 0.4.34 has no public query

    return getattr(_dist.global_state, "client", None) is not None


def _tpu_slice_hosts() -> int:
    """Hosts of the Cloud TPU slice this VM belongs to, from the environment (0 = not a TPU VM or unknown)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if hosts:
        return len(hosts)
    accel = os.environ.get("TPU_ACCELERATOR_TYPE", "")
    if accel:
        try:
            return slice_spec(accel).hosts
        except ValueError:
            return 0
    return 0


def maybe_initialize_distributed(timeout_s: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process run.

    Must run before anything touches a JAX device (``safejax.cli.main`` should call it first).
    Decided in this order:

    1. ``SAFEJAX_DISTRIBUTED=0`` (or ``off``/``false``): never initialise.
    2. ``SAFEJAX_COORDINATOR`` + ``SAFEJAX_NUM_PROCESSES`` + ``SAFEJAX_PROCESS_ID``: explicit arguments
       (localhost tests, ``tpu_setup/launch.sh`` on TPU VM slices, any cluster).
    3. ``SAFEJAX_DISTRIBUTED=1`` (or ``auto``/``true``): ``jax.distributed.initialize()`` with no
       arguments; JAX discovers the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes).
    4. A Cloud TPU VM of a multi-host slice: ``TPU_WORKER_HOSTNAMES`` lists more than one host, or
       ``TPU_ACCELERATOR_TYPE`` names a multi-host slice (``v4-32``, ``v5litepod-16``, ...); then
       ``jax.distributed.initialize()`` with no arguments (JAX reads the TPU metadata).

    A single-host TPU VM (``TPU_WORKER_ID``/``CLOUD_TPU_TASK_ID`` set, one host) needs no
    initialisation.  ``timeout_s`` (default ``SAFEJAX_DISTRIBUTED_TIMEOUT`` or 300) bounds the wait
    for the other processes; a missing peer makes JAX abort the process after it.  Calling again
    after a successful initialisation is a no-op that returns True.  Returns True if initialised."""
    flag = os.environ.get("SAFEJAX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    if _distributed_is_initialized():
        return True
    if timeout_s is None:
        timeout_s = int(os.environ.get("SAFEJAX_DISTRIBUTED_TIMEOUT", "300"))
    coord = os.environ.get("SAFEJAX_COORDINATOR")
    if coord:
        missing = [k for k in ("SAFEJAX_NUM_PROCESSES", "SAFEJAX_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise ConfigError(f"SAFEJAX_COORDINATOR={coord} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not")
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["SAFEJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["SAFEJAX_PROCESS_ID"]),
            initialization_timeout=timeout_s,
        )
        return True
    if flag in ("1", "on", "true", "yes", "auto") or _tpu_slice_hosts() > 1:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False
