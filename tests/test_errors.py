"""The CLI's error contract: the named errors (``SafejaxError``) and ``OSError`` become one line and exit 2;
anything else is a bug and keeps its traceback; ``-v`` prints the traceback of a named error too."""

from __future__ import annotations

import pytest

from safejax import cli
from safejax.checkpoint import CheckpointError, CheckpointWriteError
from safejax.config import ConfigError
from safejax.data.sources import DataError
from safejax.errors import ModelFileError, NonFiniteError, SafejaxError
from safejax.runlock import RunLockedError
from safejax.train.common import NonFiniteError as CommonNonFiniteError


@pytest.mark.parametrize("cls", [ConfigError, DataError, CheckpointError, CheckpointWriteError, NonFiniteError,
                                 RunLockedError, ModelFileError])
def test_named_errors_share_one_base(cls):
    assert issubclass(cls, SafejaxError)


def test_named_errors_keep_their_historical_bases():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(RunLockedError, OSError) and issubclass(CheckpointWriteError, OSError)
    assert issubclass(NonFiniteError, FloatingPointError) and CommonNonFiniteError is NonFiniteError
    assert not issubclass(ValueError, SafejaxError)


def _run_raising(monkeypatch, exc, *flags):
    def boom(args, cfg):
        raise exc

    monkeypatch.setattr(cli, "_run", boom)
    return cli.main([*flags, "demo", "--out", "unused-out"])


@pytest.mark.parametrize("exc", [ConfigError("config key 'x': bad\nsecond line"), OSError(28, "No space left")])
def test_named_error_or_oserror_is_one_line_exit_2_without_traceback(monkeypatch, capsys, tmp_path, exc):
    monkeypatch.chdir(tmp_path)
    assert _run_raising(monkeypatch, exc) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("safejax demo: error: ")


def test_verbose_prints_the_traceback_of_a_named_error(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run_raising(monkeypatch, DataError("rows.jsonl row 3: field 'prompt' missing"), "-v") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "safejax demo: error: rows.jsonl row 3" in err


def test_plain_value_error_is_a_bug_and_propagates(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):
        _run_raising(monkeypatch, ValueError("shape mismatch inside a jitted step"))
