"""Where models, tokenizers and datasets come from: local paths versus Hugging Face Hub ids.

Two rules that every loader follows:

* A **stage's out_dir is a model path.**  A stage writes its model to ``out_dir/hf`` (next to
  ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``), so ``model.path=runs/tiny/sft`` and
  ``model.path=runs/tiny/sft/hf`` load the same folder.  A run folder without ``hf/`` fails in one
  line that names the missing ``hf/`` folder and how to export it.
* **A path that looks local is never sent to the Hub.**  ``/abs``, ``./rel``, ``../rel``, ``~/x`` or
  anything with more than one ``/`` (``runs/tiny/sft``) cannot be a Hub id (``org/name``), so when it
  does not exist the loader fails at once, naming the path and the working directory, instead of
  retrying the Hub for a minute.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from urllib.parse import urlparse

from safejax.config import ConfigError

log = logging.getLogger("safejax")

HF_SUBDIR = "hf"
# a Hub repo id: "name" or "org/name" (letters, digits, '-', '_', '.'), never starting with '.' or '-'
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_RUN_MARKERS = ("checkpoints", "metrics.jsonl", "config.yaml")


def looks_local(path: str | os.PathLike) -> bool:
    """True when ``path`` can only mean a file or folder on this machine, never a Hub id."""
    p = os.fspath(path)
    if p in (".", "..") or p.startswith(("/", "./", "../", "~")):
        return True
    seps = {os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in p for s in seps) and not _HUB_ID.match(p)


def missing_path_error(what: str, path: str | os.PathLike) -> ConfigError:
    """The one-line error for a local path that does not exist (names the working directory)."""
    return ConfigError(f"{what} {os.fspath(path)!r}: no such file or folder (relative paths are resolved against "
                      f"the working directory {os.getcwd()})")


def check_local(what: str, path: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded; raises :func:`missing_path_error` when it looks local but does not exist.
    A Hub-id-like path (``org/name``) that does not exist locally is returned unchanged."""
    p = os.fspath(path)
    expanded = os.path.expanduser(p)
    if os.path.exists(expanded):
        return expanded
    if looks_local(p):
        raise missing_path_error(what, p)
    return p


def _is_run_dir(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, m)) for m in _RUN_MARKERS + (HF_SUBDIR,))


def _resolve_run_dir(folder: str, own_files: tuple[str, ...], what: str) -> str:
    """``folder/hf`` when ``folder`` is a stage run (its own ``own_files`` absent); else ``folder``."""
    if any(os.path.exists(os.path.join(folder, f)) for f in own_files) or not _is_run_dir(folder):
        return folder
    hf = os.path.join(folder, HF_SUBDIR)
    if any(os.path.exists(os.path.join(hf, f)) for f in own_files):
        log.debug("%s %s is a stage run: using its exported model %s", what, folder, hf)
        return hf
    raise ConfigError(f"{what} {folder!r} is a stage's out_dir but holds no exported model in {hf!r} (the stage "
                     f"writes it when it finishes; or run: safejax export --run {folder} --out {hf})")


def resolve_model_dir(path: str | os.PathLike, what: str = "model") -> str:
    """The HF model folder for ``path``: the folder itself, or ``path/hf`` for a stage's out_dir.

    Raises:
      ConfigError: ``path`` does not exist (naming the working directory), or is a run folder without ``hf/``.
    """
    p = os.fspath(path)
    if not p:
        raise ConfigError(f"no {what} path given")
    expanded = os.path.expanduser(p)
    if not os.path.exists(expanded):
        hint = ("" if looks_local(p) else "; models load from local folders only: download the Hub repo first, "
                f"e.g. `hf download {p} --local-dir models/{p.rsplit('/', 1)[-1]}`")
        raise ConfigError(str(missing_path_error(what, p)) + hint)
    if not os.path.isdir(expanded):
        return expanded
    return _resolve_run_dir(expanded, _WEIGHTS, what)


def resolve_tokenizer_path(path: str | os.PathLike) -> str:
    """A local tokenizer folder (``path/hf`` for a stage's out_dir) or a Hub id passed through unchanged.

    Raises:
      ConfigError: ``path`` looks local and does not exist, or is a run folder without ``hf/``.
    """
    p = check_local("tokenizer", path)
    if os.path.isdir(p):
        return _resolve_run_dir(p, _TOKENIZER_FILES, "tokenizer")
    if not os.path.exists(p):  # a Hub id: fail now, not after a minute of retries, when the Hub is out of reach
        host = hub_unreachable()
        if host is not None and not _hub_cached("models", p):
            raise ConfigError(f"tokenizer {p!r}: no such folder (working directory {os.getcwd()}) and the Hugging "
                             f"Face Hub ({host}) cannot be reached to load it as a Hub id")
    return p


# ----------------------------------------------------------------------------- the Hub


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """The Hub's host when it cannot even be connected to (no network), else None.  None as well in offline
    mode (``datasets`` then answers from its cache at once) and behind a proxy (a direct connection proves
    nothing there)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return None
    except OSError:
        return str(url.hostname)


def dataset_in_local_cache(hub_id: str) -> bool:
    """Whether ``datasets`` or the Hub cache holds a copy of ``hub_id`` (usable without network)."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    org, _, name = hub_id.rpartition("/")
    built = "___".join(([org] if org else []) + [camelcase_to_snakecase(name)])
    return os.path.isdir(os.path.join(datasets.config.HF_DATASETS_CACHE, built)) or _hub_cached("datasets", hub_id)


def _hub_cached(kind: str, hub_id: str) -> bool:
    """Whether the Hub cache holds files of repo ``hub_id`` (``kind``: models | datasets)."""
    from huggingface_hub import constants

    return os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{kind}--" + hub_id.replace("/", "--")))
