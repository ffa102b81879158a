"""Dataset specs, loading through ``datasets``, and mixing by proportion (ALGORITHM.md §2.1).

A *dataset spec* is a string ``name[:proportion[:path]]``:

* ``name`` is a registered name (``PKU-SafeRLHF/train``, ``PKU-SafeRLHF-30K/test``,
  ``PKU-SafeRLHF-10K/train``, ``alpaca`` ...) that maps to a Hugging Face hub dataset, or a local
  ``.json`` / ``.jsonl`` / ``.parquet`` file or a folder of them.
* ``proportion`` (default 1) is a float fraction of the rows; above 1 repeats the data.  ``a/b``
  means ``a / b``, and ``n/-1`` means exactly ``n`` rows.
* ``path`` (only after a proportion) replaces where a registered name is loaded from: a local
  file/folder or another hub id.

Selection is seeded (seed 42 by default): ``round(len * proportion)`` rows are taken as whole
copies of the source in order, then a seeded random subset (kept in file order) for the rest.

Every loaded row carries its provenance in two extra columns, ``_source`` (the file or hub id)
and ``_row`` (0-based row index inside that source), so that the builders can name the file and
row of a bad record even after mixing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

from safejax.config import ConfigError
from safejax.data.rows import ROW_COLUMN, SOURCE_COLUMN
from safejax.errors import DataError
from safejax.paths import check_local, dataset_in_local_cache, hub_unreachable

DEFAULT_SEED = 42
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A registered dataset name: hub id, default split and optional config name."""

    hub_id: str
    split: str | None = "train"
    config: str | None = None
    splits: tuple[str, ...] = ("train", "test")


DATASET_REGISTRY: dict[str, HubDataset] = {
    "PKU-SafeRLHF": HubDataset("PKU-Alignment/PKU-SafeRLHF"),
    "PKU-SafeRLHF-30K": HubDataset("PKU-Alignment/PKU-SafeRLHF-30K"),
    "PKU-SafeRLHF-10K": HubDataset("PKU-Alignment/PKU-SafeRLHF-10K", splits=("train",)),
    "alpaca": HubDataset("tatsu-lab/alpaca", splits=("train",)),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``name[:proportion[:path]]`` spec.

    Exactly one of ``proportion`` (fraction, may exceed 1) and ``num_samples`` (the ``n/-1``
    form) is set.
    """

    name: str
    proportion: float | None = 1.0
    num_samples: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        amount = f"{self.num_samples}/-1" if self.num_samples is not None else f"{self.proportion:g}"
        return f"{self.name}:{amount}" + (f":{self.path}" if self.path else "")


def _parse_amount(text: str, spec: str) -> tuple[float | None, int | None]:
    text = text.strip()
    if text == "":
        return 1.0, None
    try:
        if "/" in text:
            left, right = (p.strip() for p in text.split("/", 1))
            if right == "-1":
                n = int(left)
                if n < 0:
                    raise ValueError
                return None, n
            value = float(left) / float(right)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"dataset spec {spec!r}: proportion {text!r} is not a number, 'a/b' or 'n/-1'") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"dataset spec {spec!r}: proportion must be a finite number >= 0, got {text!r}")
    return value, None


def parse_dataset_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """Parse ``name[:proportion[:path]]`` (see the module docstring)."""
    if isinstance(spec, DatasetSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"dataset spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if os.path.exists(os.path.expanduser(spec)):  # a bare path, even one containing ':'
        return DatasetSpec(name=spec)
    name, colon, rest = spec.partition(":")
    if not name:
        raise ConfigError(f"dataset spec {spec!r}: empty name")
    if not colon:
        return DatasetSpec(name=name)
    amount, colon, path = rest.partition(":")
    proportion, num_samples = _parse_amount(amount, spec)
    if colon and not path.strip():
        raise ConfigError(f"dataset spec {spec!r}: empty path after the second ':'")
    path = os.path.expanduser(path.strip()) if colon else None
    return DatasetSpec(name=name, proportion=proportion, num_samples=num_samples, path=path)


def _registered(name: str) -> tuple[HubDataset, str | None, str | None] | None:
    """Resolve ``Name``, ``Name/split`` or ``Name/config/split`` -> (entry, config, split)."""
    parts = name.split("/")
    entry = DATASET_REGISTRY.get(parts[0])
    if entry is None or len(parts) > 3:
        return None
    if len(parts) == 1:
        return entry, entry.config, None
    if len(parts) == 2:
        return entry, entry.config, parts[1]
    return entry, parts[1], parts[2]


# ----------------------------------------------------------------------------- loading


def _dir_files(folder: str, split: str | None) -> list[str]:
    files = []
    for root, _, names in os.walk(folder):
        if os.path.basename(root).startswith("."):
            continue
        for n in names:
            if os.path.splitext(n)[1].lower() in LOCAL_EXTENSIONS:
                files.append(os.path.join(root, n))
    files.sort()
    if not files:
        raise DataError(f"{folder}: no .json/.jsonl/.parquet files in this folder")

    def split_of(f: str) -> str | None:
        rel = os.path.relpath(f, folder)
        comps = rel.split(os.sep)
        stem = os.path.splitext(comps[-1])[0].lower()
        for s in SPLIT_NAMES:
            if s in (c.lower() for c in comps[:-1]) or stem == s or stem.startswith((s + "-", s + "_", s + ".")):
                return s
        return None

    if split is None:
        return files
    tagged = {f: split_of(f) for f in files}
    chosen = [f for f in files if tagged[f] == split]
    if chosen:
        return chosen
    if all(t is None for t in tagged.values()):
        return files
    found = sorted({t for t in tagged.values() if t})
    raise DataError(f"{folder}: no data files for split {split!r} (found splits {found})")


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars ("Generating train split ...") while loading: the stage logs what it read."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _load_local(path: str, split: str | None):
    """Load a local file or folder as one ``datasets.Dataset``."""
    with _quiet_datasets():
        return _load_local_files(path, split)


def _load_local_files(path: str, split: str | None):
    import datasets

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                key = split or ("train" if "train" in ds else None)
                if key not in ds:
                    raise DataError(f"{path}: no split {split!r} in this saved dataset (has {sorted(ds)})")
                ds = ds[key]
            return ds
        files = _dir_files(path, split)
    else:
        files = [path]
    kinds = {LOCAL_EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type (use .json, .jsonl or .parquet)")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes json and parquet files; keep one format per folder")
    kind = kinds.pop()
    if kind == "json":
        for f in files:
            check_json_file(f)
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"{path}: cannot be read as a dataset: {type(e).__name__}: {e}") from e


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def check_json_file(path: str) -> None:
    """Raise :class:`DataError` naming the file and row when a local ``.json``/``.jsonl`` file is not
    UTF-8, holds no rows, or has a row that is not a JSON object (``{...}``) or not JSON at all.

    JSON-lines files are checked line by line (row = 0-based index among non-blank lines); a file
    starting with ``[`` is one JSON array of rows."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start)
        row = sum(1 for ln in data[: data.rfind(b"\n", 0, e.start) + 1].splitlines() if ln.strip())
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"{path}, row {row} (line {line + 1}): not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                        f"column {col + 1}); save the file as UTF-8") from None
    head = text.lstrip()
    if not head:
        raise DataError(f"{path}: the file is empty (no rows)")
    if head[0] == "[":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not rows:
            raise DataError(f"{path}: the JSON array is empty (no rows)")
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise DataError(f"{path}, row {i}: expected a JSON object {{...}}, got "
                                f"{_JSON_TYPES.get(type(r), type(r).__name__)}")
        return
    row = 0
    for lineno, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            if row == 0 and head[0] == "{":
                return  # one multi-line JSON document: left to the dataset loader
            raise DataError(f"{path}, row {row} (line {lineno + 1}): not valid JSON ({e.msg}, "
                            f"column {e.colno})") from None
        if not isinstance(r, dict):
            raise DataError(f"{path}, row {row} (line {lineno + 1}): expected a JSON object {{...}}, got "
                            f"{_JSON_TYPES.get(type(r), type(r).__name__)}")
        row += 1


def _load_hub(hub_id: str, config: str | None, split: str, spec: str):
    import datasets

    hint = (f"Without network, download it elsewhere and pass a local path, e.g. "
            f"'{spec.split(':')[0]}:1:/path/to/{split}.jsonl'")
    host = hub_unreachable()
    if host is not None and not dataset_in_local_cache(hub_id):  # fail now rather than after a minute of retries
        raise DataError(f"dataset {spec!r}: cannot reach the Hugging Face Hub ({host}) to load {hub_id!r}, and "
                         f"it is not in the local cache. {hint}")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(hub_id, name=config, split=split)
    except Exception as e:  # noqa: BLE001 - offline / missing dataset: explain how to use a local copy
        raise DataError(
            f"dataset {spec!r}: cannot load hub dataset {hub_id!r} (config {config}, split {split!r}): "
            f"{type(e).__name__}: {e}. {hint}") from e


def load_source(spec: str | DatasetSpec, *, split: str | None = None):
    """Load the rows of one spec *before* proportion sampling, with ``_source``/``_row`` columns.

    Args:
      spec: a dataset spec (string or :class:`DatasetSpec`); its proportion is ignored here.
      split: split to use when the name does not say one (registered names) or to choose files in
        a local folder.

    Returns:
      ``datasets.Dataset``.
    """
    spec = parse_dataset_spec(spec)
    reg = _registered(spec.name)
    if reg is not None:
        entry, config, name_split = reg
        use_split = name_split or split or entry.split
        if spec.path is not None:
            local = check_local(f"dataset {str(spec)!r}: path", spec.path)  # never retry the Hub for a local path
            if os.path.exists(local):
                ds, source = _load_local(local, use_split), local
            else:
                ds, source = _load_hub(spec.path, config, use_split, str(spec)), spec.path
        else:
            ds, source = _load_hub(entry.hub_id, config, use_split, str(spec)), f"{entry.hub_id}[{use_split}]"
    else:
        if spec.path is not None:
            raise ConfigError(f"dataset spec {str(spec)!r}: a path may only follow a registered name "
                             f"({sorted(DATASET_REGISTRY)})")
        local = os.path.expanduser(spec.name)
        if not os.path.exists(local):
            raise ConfigError(f"dataset {spec.name!r}: not a registered name ({', '.join(sorted(DATASET_REGISTRY))}, "
                             f"optionally with /split) and no such file or folder (working directory {os.getcwd()})")
        ds, source = _load_local(local, split), local
    for col in (SOURCE_COLUMN, ROW_COLUMN):
        if col in ds.column_names:
            ds = ds.remove_columns(col)
    ds = ds.add_column(SOURCE_COLUMN, [source] * len(ds))
    ds = ds.add_column(ROW_COLUMN, np.arange(len(ds), dtype=np.int64))
    return ds


def sample_indices(num_rows: int, *, proportion: float | None = 1.0, num_samples: int | None = None,
                   rng: np.random.Generator) -> np.ndarray:
    """Indices selected from a source of ``num_rows`` rows.

    The count is ``num_samples`` if given, else ``round(num_rows * proportion)``.  Whole copies of
    ``range(num_rows)`` come first; the remainder is a random subset without replacement, sorted.

    Returns:
      ``[count]`` int64.
    """
    count = int(num_samples) if num_samples is not None else int(round(num_rows * float(proportion)))
    if num_rows == 0 or count == 0:
        return np.zeros((0,), np.int64)
    full, rest = divmod(count, num_rows)
    parts = [np.arange(num_rows, dtype=np.int64)] * full
    if rest:
        parts.append(np.sort(rng.permutation(num_rows)[:rest]).astype(np.int64))
    return np.concatenate(parts)


def load_rows(spec_or_specs: str | DatasetSpec | Sequence[str | DatasetSpec], *, split: str | None = None,
              seed: int = DEFAULT_SEED):
    """Load one or several dataset specs and mix them by proportion into one ``datasets.Dataset``.

    Args:
      spec_or_specs: a spec or a list of specs (``name[:proportion[:path]]``).
      split: split for registered names without one, and for choosing files in local folders.
      seed: sampling seed (source ``i`` uses ``np.random.default_rng([seed, i])``).

    Returns:
      The selected rows of every source, concatenated in spec order.  Only the columns common to
      all sources are kept, plus ``_source`` and ``_row``.
    """
    import datasets

    specs = [spec_or_specs] if isinstance(spec_or_specs, (str, DatasetSpec)) else list(spec_or_specs)
    if not specs:
        raise ConfigError("load_rows: no dataset specs given")
    parts = []
    for i, raw in enumerate(specs):
        spec = parse_dataset_spec(raw)
        ds = load_source(spec, split=split)
        idx = sample_indices(len(ds), proportion=spec.proportion, num_samples=spec.num_samples,
                             rng=np.random.default_rng([seed, i]))
        if not (len(idx) == len(ds) and np.array_equal(idx, np.arange(len(ds)))):
            ds = ds.select(idx)
        parts.append((str(spec), ds))
    if len(parts) == 1:
        return parts[0][1]
    common = [c for c in parts[0][1].column_names if all(c in ds.column_names for _, ds in parts[1:])]
    if common == [SOURCE_COLUMN, ROW_COLUMN] or not common:
        raise DataError(f"load_rows: the sources {[s for s, _ in parts]} have no data columns in common")
    first_features = datasets.Features({c: parts[0][1].features[c] for c in common})
    aligned = []
    for name, ds in parts:
        ds = ds.select_columns(common)
        if ds.features != first_features:
            try:
                ds = ds.cast(first_features)
            except Exception as e:  # noqa: BLE001
                diff = [c for c in common if ds.features[c] != first_features[c]]
                raise DataError(f"load_rows: {name}: columns {diff} have types that differ from "
                                f"{parts[0][0]} and cannot be cast: {e}") from e
        aligned.append(ds)
    return datasets.concatenate_datasets(aligned)
