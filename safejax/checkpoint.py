"""Orbax checkpoints of whole train states (plus a small JSON of host-side positions).

Each checkpoint step ``<dir>/<step>/`` holds two items: ``state`` (the train-state pytree, sharded,
restored onto the shardings of an abstract target, so a different mesh reshards) and ``meta`` (JSON:
data-iterator position, metric-file offset, counters...).

Guarantees (see ``tests/test_resume.py``):

* **atomic**: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when both
  items are complete; unfinished folders are never listed as steps (and are removed when the next
  :class:`Checkpointer` opens the directory), so a crash mid-save leaves the previous step usable;
* **asynchronous**: :meth:`Checkpointer.save` returns once the arrays are copied off the devices;
  :meth:`Checkpointer.wait` blocks until the background write is committed;
* **keep-last-K** (``max_to_keep``);
* **content fingerprints**: every save records a 64-bit fingerprint of each array's bits
  (:func:`fingerprints`, position-weighted sums that change under any single flipped bit) in
  ``meta``; restore recomputes them and treats a difference like an unreadable step;
* **checked restore**: the on-disk tree (paths, shapes, dtypes) is compared with the target first.
  A difference raises :class:`CheckpointMismatchError` naming the first differing array (never a
  silent fresh start); an unreadable or partial step is skipped with a warning, moved aside to
  ``<dir>.corrupt/``, and the previous step is used.
* **multi-host**: every process calls the same methods; only process 0 moves folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from safejax import checkpoint_noise
from safejax.checkpoint_noise import quiet_libraries
from safejax.errors import SafejaxError

log = logging.getLogger("safejax")

TMP_MARK = ".orbax-checkpoint-tmp"
FINGERPRINTS = "fingerprints"  # meta key: {"a.b.0": 16 hex digits}


class CheckpointError(SafejaxError, ValueError):
    """No usable checkpoint (all candidates unreadable) or a bad request; the message names the folder."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's arrays do not match the model / state being trained (names the array and shapes)."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct target (with shardings) for restoring ``tree``'s structure."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{"a.b.0": leaf}`` in flattening order (pytree keys joined by dots; dict keys 0 and "0" alike)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): x for path, x in flat}


def leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a.b.0": (shape, dtype name)}`` for every array leaf (pytree keys joined by dots).

    Works on live arrays, ``ShapeDtypeStruct`` targets and orbax metadata trees alike, so the
    on-disk layout of a checkpoint can be compared with the state about to be restored."""
    out = {}
    for name, x in named_leaves(tree).items():
        dtype = getattr(x, "dtype", None)
        out[name] = (tuple(int(d) for d in getattr(x, "shape", ())), str(np.dtype(dtype)) if dtype is not None else "?")
    return out


def describe_mismatch(on_disk: dict, wanted: dict) -> str | None:
    """First difference between two :func:`leaf_table` results, in words (None when equal)."""
    missing = [k for k in wanted if k not in on_disk]
    extra = [k for k in on_disk if k not in wanted]
    if missing:
        return (f"array '{missing[0]}' is not in the checkpoint"
                + (f" ({len(missing)} missing, {len(extra)} unexpected)" if len(missing) + len(extra) > 1 else ""))
    if extra:
        return f"the checkpoint holds array '{extra[0]}' that the current state does not have ({len(extra)} such)"
    for name in wanted:  # the state's own order: params before optimizer moments
        (ws, wd), (ds, dd) = wanted[name], on_disk[name]
        if ws != ds:
            return f"array '{name}' has shape {list(ds)} in the checkpoint but {list(ws)} in the current state"
        if wd != dd and "?" not in (wd, dd):
            return f"array '{name}' has dtype {dd} in the checkpoint but {wd} in the current state"
    return None


# ----------------------------------------------------------------------------- content fingerprints


def _words(x: jax.Array) -> jax.Array:
    """The bit pattern of every element as uint32 words (8-byte types: a trailing axis of 2)."""
    dt = jnp.dtype(x.dtype)
    if dt == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dt.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """``[2]`` uint32: two position-weighted wrap-around sums of ``x``'s bits.

    Each weight is odd, so flipping any one bit changes both sums; integer sums are exact in any
    order, so the value does not depend on the sharding (a resharded restore checks the same)."""
    w = _words(x)
    idx = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % (1 << 32))
        stride *= w.shape[d]
    w1 = idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
    w2 = idx * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x165667B1) | jnp.uint32(1)
    rot = (w << 13) | (w >> 19)
    return jnp.stack([jnp.sum(w * w1, dtype=jnp.uint32), jnp.sum((rot ^ idx) * w2, dtype=jnp.uint32)])


@jax.jit
def _fingerprint_all(leaves: list) -> list:
    return [_fingerprint(x) for x in leaves]


def fingerprints(tree: Any) -> dict[str, str]:
    """``{"a.b.0": "0123456789abcdef"}``: a 64-bit content fingerprint of every array leaf of ``tree``
    (computed on device in one jitted call; one small transfer)."""
    named = {k: v for k, v in named_leaves(tree).items() if hasattr(v, "dtype") and hasattr(v, "shape")}
    if not named:
        return {}
    values = jax.device_get(_fingerprint_all([jnp.asarray(v) for v in named.values()]))
    return {k: "%08x%08x" % tuple(int(u) for u in np.asarray(v)) for k, v in zip(named, values)}


def verify_fingerprints(tree: Any, recorded: dict | None, prefix: str = "") -> str | None:
    """First array of ``tree`` whose content differs from ``recorded`` (names prefixed with ``prefix``),
    in words; None when all agree or nothing was recorded (checkpoints of older versions)."""
    if not recorded:
        return None
    bad = [k for k, v in fingerprints(tree).items() if prefix + k in recorded and recorded[prefix + k] != v]
    if not bad:
        return None
    more = f" and {len(bad) - 1} other array(s)" if len(bad) > 1 else ""
    return f"content of array '{prefix + bad[0]}'{more} differs from the fingerprint recorded at save time"


def read_step_meta(step_dir: str | os.PathLike) -> dict | None:
    """The JSON ``meta`` item of a checkpoint step folder, read directly (no orbax); None if unreadable."""
    try:
        meta = json.loads((Path(step_dir) / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


class CheckpointWriteError(SafejaxError, OSError):
    """A checkpoint could not be written (full disk, read-only filesystem, permissions); the earlier
    steps are intact.  The message names the folder and the operating-system error."""


_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _write_error(e: BaseException, directory: Path, step: int | None) -> CheckpointWriteError | None:
    """:class:`CheckpointWriteError` for an I/O failure surfacing from orbax / tensorstore, else None."""
    code = e.errno if isinstance(e, OSError) else None
    m = _OS_ERROR.search(str(e))
    if m:
        code = int(m.group(1))
    if code is None and not isinstance(e, OSError):
        return None
    why = os.strerror(code) if code else _first_line(e)
    what = f"step {step}" if step is not None else "a checkpoint"
    err = CheckpointWriteError(f"cannot write {what} to {directory}: {why}" + (f" (errno {code})" if code else "")
                               + "; the earlier checkpoints are intact; free space or fix permissions and rerun "
                                 "to resume")
    err.errno = code
    return err


class Checkpointer:
    """Keep-last-K asynchronous checkpoints under ``directory`` (see the module docstring).

    ``read_only=True`` opens existing checkpoints without creating, cleaning or moving anything
    (used by ``safejax export``).  ``base_meta`` is added to every save's meta; ``check_meta(meta,
    step_dir)`` vets the meta of the step :meth:`restore` picked (raising refuses the resume)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True,
                 read_only: bool = False, base_meta: dict | None = None,
                 check_meta: Callable[[dict, Path], None] | None = None):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.base_meta = dict(base_meta or {})  # merged into every save's meta (config, data fingerprint)
        self.check_meta = check_meta  # called with (meta, step folder) of the restored step; may raise
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoint folder")
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mngr = self._make_manager(max_to_keep, async_save)
        self._failed = False  # a write failed (its stragglers may log after close: see checkpoint_noise)
        self._closed = False
        checkpoint_noise.acquire()
        self._max_to_keep, self._async = max_to_keep, async_save
        self._saving: int | None = None

    def _make_manager(self, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None if self.read_only else max_to_keep, enable_async_checkpointing=async_save,
            save_interval_steps=0 if self.read_only else 1,
            create=not self.read_only, read_only=self.read_only, cleanup_tmp_directories=not self.read_only)
        absl = logging.getLogger("absl")
        level = absl.level
        if self.read_only:  # orbax warns that a read-only manager will not save: that is the point
            absl.setLevel(logging.ERROR)
        try:
            return ocp.CheckpointManager(self.directory, options=opts, item_handlers={
                "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        finally:
            absl.setLevel(level)

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = True) -> bool:  # noqa: ARG002
        """Start an asynchronous save of ``state`` (+ JSON ``meta``) as ``step`` (waits for the previous one).

        Always saves (``force`` is accepted for compatibility); the arrays are copied off the devices
        before this returns, so the caller may donate ``state`` to the next step right away."""
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only")
        meta = dict(self.base_meta, **(meta or {}))
        meta[FINGERPRINTS] = fingerprints(state)
        with self._io(self._saving if self._saving is not None else int(step)):  # or the previous save's error
            ok = self._mngr.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._saving = int(step)
        log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return ok

    @contextlib.contextmanager
    def _io(self, step: int | None):
        """Turn an I/O failure of orbax into one :class:`CheckpointWriteError` (bugs keep their traceback)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            err = _write_error(e, self.directory, step)
            if err is None:
                raise
            self._failed = True
            raise err from None

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed (:class:`CheckpointWriteError` if it failed)."""
        with self._io(self._saving):
            self._mngr.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with quiet_libraries(), contextlib.suppress(Exception):
                self._mngr.close()
            if not self._closed:
                self._closed = True
                checkpoint_noise.release(failed=self._failed)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        """Close on leaving a ``with`` block: an unclosed manager's background save threads and event
        loop outlive it (errors such as "Event loop is closed" at interpreter exit)."""
        self.close()

    # ------------------------------------------------------------------ listing

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._mngr.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(int(step))

    def unfinished(self) -> list[Path]:
        """Folders of saves that never completed (``<step>.orbax-checkpoint-tmp-*``)."""
        return sorted(p for p in self.directory.iterdir() if TMP_MARK in p.name) if self.directory.is_dir() else []

    # ------------------------------------------------------------------ restoring

    def on_disk_table(self, step: int) -> dict:
        """:func:`leaf_table` of the ``state`` item of ``step`` (reads metadata only)."""
        md = self._mngr.item_metadata(int(step))["state"]
        if md is None:
            raise CheckpointError(f"{self.step_dir(step)}: no 'state' metadata")
        return leaf_table(getattr(md, "tree", md))

    def restore(self, target: Any, step: int | None = None, *,
                required_meta: Sequence[str] = ()) -> tuple[Any, dict, int] | None:
        """Restore the newest complete checkpoint (or exactly ``step``) onto ``target``'s shapes/shardings.

        Returns ``(state, meta, step)``, or None when the folder holds no checkpoint at all.
        Raises :class:`CheckpointMismatchError` when a readable checkpoint does not fit ``target``
        and :class:`CheckpointError` when no candidate is readable.  Unreadable steps newer than
        the one restored are moved to ``<dir>.corrupt/`` (unless read-only) with a warning."""
        steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
        if step is not None and int(step) not in self.all_steps():
            raise CheckpointError(f"step {step} is not among the complete checkpoints in {self.directory}: "
                                  f"{self.all_steps()}")
        wanted = leaf_table(target)
        bad: list[tuple[int, str]] = []
        for s in steps:
            try:
                with quiet_libraries():
                    on_disk = self.on_disk_table(s)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a partial / corrupt step
                bad.append((s, _first_line(e)))
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory,
                            bad[-1][1])
                continue
            diff = describe_mismatch(on_disk, wanted)
            if diff is not None:
                raise CheckpointMismatchError(
                    f"checkpoint {self.step_dir(s)} does not match the model being trained: {diff}; the out_dir "
                    "belongs to a different model or config (use a new out_dir)")
            try:
                with quiet_libraries():
                    out = self._mngr.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
                meta = dict(out["meta"] or {})
                missing = [k for k in required_meta if k not in meta]
                if missing:
                    raise CheckpointError(f"meta lacks {missing}")
                corrupt = verify_fingerprints(out["state"], meta.get(FINGERPRINTS))
                if corrupt is not None:
                    raise CheckpointError(corrupt)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt data: fall back to an older checkpoint
                bad.append((s, _first_line(e)))
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory,
                            bad[-1][1])
                continue
            if bad:
                self._quarantine([b for b, _ in bad])
                log.warning("resuming from checkpoint step %d in %s instead of the unreadable step(s) %s",
                            s, self.directory, [b for b, _ in bad])
            if self.check_meta is not None:
                self.check_meta(meta, self.step_dir(s))
            return out["state"], meta, s
        if bad:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: step(s) "
                                  + ", ".join(f"{s} ({why})" for s, why in bad)
                                  + "; delete the folder (or use a new out_dir) to start over")
        return None

    def _quarantine(self, steps: Sequence[int]) -> None:
        """Move unreadable step folders to ``<dir>.corrupt/<step>-<time>`` so the steps can be saved again."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            dest_root = self.directory.parent / (self.directory.name + ".corrupt")
            dest_root.mkdir(exist_ok=True)
            for s in steps:
                src = self.step_dir(s)
                if src.exists():
                    dest = dest_root / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                    shutil.move(str(src), str(dest))
                    log.warning("moved unreadable checkpoint %s to %s", src, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("safejax_checkpoint_quarantine")
        self._mngr.reload()

    def restore_subtree(self, path: Sequence[str], step: int | None = None) -> tuple[Any, dict, int]:
        """Read only the ``state`` subtree at ``path`` (e.g. ``("actor", "params")``) as host-local arrays
        on the first local device, whatever mesh saved it.  Unreadable newer steps fall back (no moving)."""
        steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is not None and int(step) not in self.all_steps():
            raise CheckpointError(f"step {step} is not among the complete checkpoints in {self.directory}: "
                                  f"{self.all_steps()}")
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        last = ""
        for s in steps:
            try:
                md = self._mngr.item_metadata(s)
                tree = getattr(md["state"], "tree", md["state"])
                sub = tree
                for p in path:
                    if not isinstance(sub, dict) or p not in sub:
                        raise CheckpointMismatchError(
                            f"checkpoint {self.step_dir(s)} has no '{'.'.join(path)}' (top-level keys: "
                            f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__})")
                    sub = sub[p]
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), sub)
                item = target
                for p in reversed(path):
                    item = {p: item}
                with quiet_libraries(), ocp.PyTreeCheckpointer() as ckptr:
                    raw = ckptr.restore(self.step_dir(s) / "state", args=ocp.args.PyTreeRestore(
                        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True))
                meta = dict(self._mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
                corrupt = verify_fingerprints(raw, meta.get(FINGERPRINTS))
                if corrupt is not None:
                    raise CheckpointError(corrupt)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001
                last = _first_line(e)
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory,
                            last)
                continue
            for p in path:
                raw = raw[p]
            return raw, meta, s
        raise CheckpointError(f"no readable checkpoint in {self.directory} (last error: {last})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (type(e).__name__ + ": " + (text[0] if text else ""))[:240]
