"""bench_harness.py - the budget / watchdog / JSON harness that ppo_bench.py's sections run in.

Every section is timed and wrapped in try/except (one broken section loses nothing else), skipped when
too little of ``--budget`` is left, and the JSON is rewritten after each one; a watchdog thread writes
it and exits with 3 when the budget is reached, whatever is running.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback

_LOCK = threading.RLock()


def log(msg: str = "") -> None:
    with _LOCK:
        sys.stdout.write(str(msg) + "\n")
        sys.stdout.flush()


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    try:
        f = float(obj)
        return f if math.isfinite(f) else None
    except Exception:  # noqa: BLE001
        return str(obj)


def median(xs):
    return statistics.median(xs) if xs else None


class Harness:
    """Budget, watchdog and JSON bookkeeping of a benchmark made of timed sections.

    A subclass sets :attr:`caps` (``{section: (soft cap s, minimum s left to start it)}``) and defines
    ``finish()`` (summary); :meth:`run` runs one section under the budget, :meth:`watchdog` writes the JSON
    and exits with 3 when the budget is spent whatever is running."""

    caps: dict = {}

    def __init__(self, args, cfg: dict):
        self.args, self.c = args, cfg
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.R: dict = {"meta": {"argv": sys.argv, "config": cfg, "budget_s": args.budget, "started": self.t0,
                                 "python": platform.python_version(), "host": platform.node(),
                                 "mem_fraction_env": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")},
                        "sections": {}, "finished": False}
        self.current: str | None = None

    # ---- bookkeeping
    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        with _LOCK:
            self.R["meta"]["wall_s"] = time.time() - self.t0
            path = self.args.out
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(_clean(self.R), f, indent=1)
            os.replace(path + ".tmp", path)

    def run(self, name: str, fn) -> None:
        soft_cap, min_left = self.caps[name] if not self.args.tiny else (1e9, 0)
        if self.args.only and name not in self.args.only:
            return
        if self.left() < min_left:
            self.R["sections"][name] = {"skipped": f"only {self.left():.0f}s of the budget left (needs {min_left}s)"}
            log(f"== {name}: SKIPPED ({self.left():.0f}s left)")
            self.save()
            return
        log(f"== {name} ({self.left():.0f}s of the budget left)")
        self.current = name
        self.R["sections"][name] = {"in_progress": True}
        t = time.time()
        soft = min(t + soft_cap, self.deadline - 5)
        try:
            out = fn(soft)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            out = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
            log(f"   ERROR {type(e).__name__}: {str(e)[:500]}")
        out["section_wall_s"] = time.time() - t
        with _LOCK:
            self.R["sections"][name] = out
            self.current = None
        self.save()
        gc.collect()

    def watchdog(self) -> None:
        def fire():
            with _LOCK:
                if self.current:
                    self.R["sections"][self.current] = dict(self.R["sections"].get(self.current, {}),
                                                            killed_at_budget=True, in_progress=False)
                self.R["killed_at_budget"] = True
            log(f"!! budget of {self.args.budget:.0f}s reached during '{self.current}': writing results and exiting")
            try:
                self.finish()
            finally:
                os._exit(3)

        t = threading.Timer(max(self.left(), 0.1), fire)
        t.daemon = True
        t.start()

    # ---- environment
    def environment(self) -> None:
        import jax
        import numpy as np

        versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
        for mod in ("jaxlib", "flax", "optax", "orbax.checkpoint"):
            try:
                m = __import__(mod, fromlist=["_"])
                versions[mod] = getattr(m, "__version__", None) or getattr(getattr(m, "version", None),
                                                                           "__version__", "?")
            except Exception as e:  # noqa: BLE001
                versions[mod] = f"import failed: {type(e).__name__}"
        devs = jax.devices()
        self.R["meta"]["versions"] = versions
        self.R["meta"]["device"] = {"backend": jax.default_backend(), "count": len(devs),
                                    "kind": getattr(devs[0], "device_kind", None), "devices": [str(d) for d in devs]}
        log(f"versions: {versions}")
        log(f"device: {self.R['meta']['device']}")
        self.save()

    def peak_mem_gb(self):
        import jax

        try:
            st = jax.devices()[0].memory_stats() or {}
            v = st.get("peak_bytes_in_use")
            return v / 1e9 if v else None
        except Exception:  # noqa: BLE001
            return None

