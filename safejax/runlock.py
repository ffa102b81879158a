"""One writer per run directory: a lock file with a heartbeat.

A training command takes ``<out_dir>/.safejax-lock`` before it reads or writes anything there and
gives it back when it ends.  A second command on the same ``out_dir`` meets :class:`RunLockedError`
(the CLI prints one line and exits 2) instead of interleaving checkpoints and metrics with the first.

A writer that crashed cannot release its lock, so a lock is *stale* (taken over with a warning) when

* its holder ran on this host and that process is gone (pid no longer alive, or alive but started
  at another time, i.e. the pid was reused), or
* its heartbeat is older than the lease (``lease_s``, default 5 minutes): the holder's process
  rewrites the file's timestamp every ``heartbeat_s`` (default 30 s) from a daemon thread.  This is
  what works across machines sharing a filesystem (NFS, GCS fuse on TPU slices), where the pid of
  another host cannot be checked.  A command started within the lease after a crash on *another*
  host therefore waits out the lease; the message says when the lock was last refreshed.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+); a stale lock is
first renamed away (only one contender's rename succeeds) and re-created the same way.

Multi-host runs share one ``out_dir``: only process 0 takes the lock (the other processes of a slice
are started together with it by the launcher and write nothing process 0 does not coordinate).
Re-entrant within one process: a process may take a lock it already holds (a library user running
two stages in a row, the tests calling the CLI in-process); locks are given back at interpreter exit
at the latest.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from safejax.errors import SafejaxError

log = logging.getLogger("safejax")

LOCK_NAME = ".safejax-lock"
HEARTBEAT_S = 30.0
LEASE_S = 300.0


class RunLockedError(SafejaxError, OSError):
    """Another live command holds the run directory's lock; the message names it and the lock file."""


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "since": time.time()}


class RunLock:
    """The lock of one run directory (see the module docstring); :meth:`acquire` / :meth:`release`."""

    def __init__(self, directory: str | os.PathLike, *, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.lease_s = float(lease_s)
        self.heartbeat_s = float(heartbeat_s)
        self.held = False

    # -------------------------------------------------------------- reading the current holder

    def holder(self) -> dict | None:
        """The holder recorded in the lock file (``{}`` when unreadable), None when there is no lock."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
            return rec if isinstance(rec, dict) else {}
        except json.JSONDecodeError:
            return {}  # torn by a crash while being written

    def _age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def stale_reason(self, rec: dict) -> str | None:
        """Why the lock held by ``rec`` may be taken over, or None while its holder may be alive."""
        age = self._age()
        if age is not None and age > self.lease_s:
            return f"its heartbeat is {age:.0f} s old (lease {self.lease_s:.0f} s)"
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            pid = rec["pid"]
            if pid == os.getpid():
                return None  # ours (re-entrant); handled by the caller
            if not _pid_alive(pid):
                return f"its process {pid} on this host is gone"
            start = _proc_start(pid)
            if rec.get("start") is not None and start is not None and start != rec["start"]:
                return f"its process {pid} on this host is gone (the pid now belongs to another process)"
        if not rec and age is not None and age > min(self.lease_s, 2 * self.heartbeat_s):
            return "its lock file is unreadable and was not refreshed"
        return None

    # -------------------------------------------------------------- taking and giving back

    def _create(self) -> bool:
        """Create the lock file exclusively with our identity; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self._me))
        return True

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` (one line naming the holder and the lock file)."""
        if self.held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._me = _identity()
        for _ in range(3):  # a contender may create or remove the file between our steps
            if self._create():
                break
            rec = self.holder()
            if rec is None:
                continue  # released meanwhile
            if rec.get("host") == self._me["host"] and rec.get("pid") == self._me["pid"]:
                self._me = rec  # we hold it already (an earlier stage of this process)
                break
            why = self.stale_reason(rec)
            if why is None:
                age = self._age()
                raise RunLockedError(
                    f"{self.directory} is in use by another safejax command (pid {rec.get('pid', '?')} on host "
                    f"{rec.get('host', '?')}, heartbeat {0 if age is None else age:.0f} s ago; lock file {self.path}); "
                    "wait for it to finish or use another out_dir (a lock whose writer crashed is taken over "
                    f"once its process is gone, or after {self.lease_s:.0f} s without heartbeat)")
            if self._take_over(rec):
                log.warning("%s: taking over the lock of a crashed command (%s)", self.directory, why)
                break
        else:
            raise RunLockedError(f"{self.directory}: could not take the lock {self.path} (contended); retry")
        self.held = True
        _registry.add(self)
        return self

    def _take_over(self, rec: dict) -> bool:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self._me['host']}-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # only one contender's rename of this file succeeds
        except FileNotFoundError:
            return self._create()
        try:
            moved = json.loads(aside.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            moved = {}
        if moved != rec and moved:  # a contender re-created the lock between our read and rename: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def heartbeat(self) -> None:
        """Refresh the lock file's timestamp (called periodically while held)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        _registry.discard(self)
        rec = self.holder()
        if rec is not None and rec.get("host") == self._me["host"] and rec.get("pid") == self._me["pid"]:
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


class _Registry:
    """Locks held by this process: refreshed by one daemon thread, released at exit."""

    def __init__(self):
        self.locks: dict[Path, RunLock] = {}
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lock: RunLock) -> None:
        with self._mu:
            old = self.locks.get(lock.path)
            if old is not None and old is not lock:
                old.held = False  # the same file taken again by this process: one owner object
            self.locks[lock.path] = lock
            self._wake.set()  # a new lock may want a shorter period
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="safejax-lock-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, lock: RunLock) -> None:
        with self._mu:
            if self.locks.get(lock.path) is lock:
                del self.locks[lock.path]

    def _beat(self) -> None:
        while True:
            with self._mu:
                locks = list(self.locks.values())
            period = min([lk.heartbeat_s for lk in locks] or [HEARTBEAT_S])
            for lk in locks:
                lk.heartbeat()
            self._wake.wait(max(period, 0.05))
            self._wake.clear()

    def release_all(self) -> None:
        with self._mu:
            locks = list(self.locks.values())
        for lk in locks:
            lk.release()


_registry = _Registry()
release_all = _registry.release_all
atexit.register(release_all)
