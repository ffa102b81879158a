"""Keep orbax / tensorstore / asyncio from printing a traceback per array when a checkpoint read or write fails.

A failed save is reported once, in one line, by :class:`safejax.checkpoint.Checkpointer`; underneath, orbax
logs an error with a traceback for every array and thread, tensorstore completes the other pending writes on an
event loop orbax has already closed (``RuntimeError: Event loop is closed``, once per write), and asyncio logs
"exception was never retrieved" when the failed write's futures are garbage collected -- possibly long after.

:func:`acquire` / :func:`release` scope the two measures to the time a ``Checkpointer`` is open (reference
counted, so nested or concurrent checkpointers share them):

* a logging filter on the ``absl``, ``orbax`` and ``asyncio`` loggers that turns their ERROR records into one
  DEBUG line of the ``safejax`` logger;
* ``asyncio.BaseEventLoop.call_soon_threadsafe`` dropping callbacks aimed at a *closed* loop (they would be
  dropped anyway; only the traceback goes).

After a failed write (``release(failed=True)``) both stay in place until the process exits: the stragglers of
that write finish after its manager closed, and the process is on its way to exit 2.  Otherwise the last
``release`` restores the loggers and ``call_soon_threadsafe`` exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

log = logging.getLogger("safejax")

# loggers of the libraries under orbax that print tracebacks for every failed read or write
NOISY = ("absl", "orbax", "tensorstore", "asyncio", "jax._src.distributed")
FILTERED = ("absl", "orbax", "asyncio")  # their ERROR records are dropped while a Checkpointer is open


class _OwnErrors(logging.Filter):
    """Drop ERROR records (each with a traceback); their first line goes to the ``safejax`` log at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        try:
            log.debug("orbax: %s", record.getMessage().splitlines()[0][:300])
        except Exception:  # noqa: BLE001 - a malformed record
            pass
        return False


class _Guard:
    """The reference-counted state of the two measures (one per process, guarded by a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0
        self.pinned = False  # a write failed: keep everything until exit
        self.filter = _OwnErrors()
        self.original = None  # call_soon_threadsafe before we replaced it

    def install(self) -> None:
        for name in FILTERED:
            logging.getLogger(name).addFilter(self.filter)
        base = asyncio.BaseEventLoop
        original = self.original = base.call_soon_threadsafe

        def call_soon_threadsafe(loop, callback, *args, **kwargs):
            if loop.is_closed():
                return None
            return original(loop, callback, *args, **kwargs)

        base.call_soon_threadsafe = call_soon_threadsafe

    def uninstall(self) -> None:
        for name in FILTERED:
            logging.getLogger(name).removeFilter(self.filter)
        asyncio.BaseEventLoop.call_soon_threadsafe = self.original
        self.original = None


_GUARD = _Guard()


def acquire() -> None:
    """A Checkpointer opens: install the measures if it is the first."""
    with _GUARD.lock:
        if _GUARD.users == 0 and _GUARD.original is None:
            _GUARD.install()
        _GUARD.users += 1


def release(*, failed: bool = False) -> None:
    """A Checkpointer closes (``failed``: one of its writes failed): uninstall after the last, unless pinned."""
    with _GUARD.lock:
        _GUARD.users = max(0, _GUARD.users - 1)
        _GUARD.pinned = _GUARD.pinned or failed
        if _GUARD.users == 0 and not _GUARD.pinned and _GUARD.original is not None:
            _GUARD.uninstall()


def installed() -> bool:
    """Whether the measures are in place now (for tests)."""
    return _GUARD.original is not None


@contextlib.contextmanager
def quiet_libraries():
    """Silence the per-file error logs (and tracebacks) of orbax / tensorstore while a read or write
    is attempted; the caller reports the failure in one line."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in NOISY]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
