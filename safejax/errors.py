"""The named errors of bad user input, under one base class.

Every error that means "the user gave something wrong or the world got in the way" (a config key, a
data row, a checkpoint folder, a non-finite loss, a locked run directory, an unwritable checkpoint)
derives from :class:`SafejaxError`.  The CLI turns exactly those (and ``OSError``) into one line on
stderr with exit status 2; any other exception is a bug and keeps its traceback.

The subclasses keep their historical second base (``ValueError``, ``OSError``,
``FloatingPointError``) so that callers catching those still work.
"""

from __future__ import annotations


class SafejaxError(Exception):
    """Base of the errors that the CLI reports as one line (exit 2): bad input, not a bug."""


class DataError(SafejaxError, ValueError):
    """Malformed data: the message names the source (file), the row and the field."""


class NonFiniteError(SafejaxError, FloatingPointError):
    """A loss, gradient norm or multiplier became NaN/Inf; the message names the step and quantity."""


class ModelFileError(SafejaxError, ValueError):
    """An HF model folder cannot be used (``config.json``, safetensors weights, tokenizer size); the message
    names the file and the field or tensor."""
