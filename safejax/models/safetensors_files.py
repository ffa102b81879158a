"""Reading tensors by name from an HF folder's ``.safetensors`` files (one file or a sharded index)."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from safejax.errors import ModelFileError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class TensorFiles:
    """Name -> tensor access over one or more ``.safetensors`` files, memory mapped.

    Uses ``safetensors.safe_open(framework="numpy")`` and ``get_slice``; dtypes numpy lacks
    (bfloat16, float8) are read from a ``np.memmap`` of the same bytes viewed as ``ml_dtypes``."""

    _ML = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

    def __init__(self, files: Mapping[str, str]):
        self.file_of = dict(files)  # tensor name -> file path
        self._handles = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        for path in sorted(set(self.file_of.values())):
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # noqa: BLE001 - corrupt / not a safetensors file
                raise ModelFileError(f"{path}: cannot open as safetensors ({e})") from e

    @classmethod
    def from_folder(cls, folder: str) -> "TensorFiles":
        index = os.path.join(folder, WEIGHTS_INDEX_NAME)
        single = os.path.join(folder, WEIGHTS_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelFileError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
            files = {name: os.path.join(folder, fn) for name, fn in weight_map.items()}
            for fn in sorted(set(files.values())):
                if not os.path.exists(fn):
                    raise ModelFileError(f"{index}: lists shard {os.path.basename(fn)} which is missing from {folder}")
            return cls(files)
        if os.path.exists(single):
            tf = cls({})

            try:
                h = safe_open(single, framework="numpy")
            except Exception as e:  # noqa: BLE001
                raise ModelFileError(f"{single}: cannot open as safetensors ({e})") from e
            tf._handles[single] = h
            tf.file_of = {k: single for k in h.keys()}
            return tf
        others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if others:
            tf = cls({})

            for fn in others:
                h = safe_open(fn, framework="numpy")
                tf._handles[fn] = h
                tf.file_of.update({k: fn for k in h.keys()})
            return tf
        bins = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
                      + glob.glob(os.path.join(folder, "*.pth")))
        if bins:
            raise ModelFileError(
                f"{folder}: only PyTorch pickle weights found ({', '.join(os.path.basename(b) for b in bins)}); "
                "safejax reads safetensors only and never unpickles. Convert the folder first, e.g. "
                "`transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
                "safe_serialization=True)`.")
        raise ModelFileError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (index: one slice per axis, explicit start/stop) as numpy."""
        path = self.file_of[name]
        sl = self._handles[path].get_slice(name)
        dt = sl.get_dtype()
        if dt in self._ML:
            base, header = self._header(path)
            info = header[name]
            start, _ = info["data_offsets"]
            ml = jnp.dtype(self._ML[dt])
            mm = np.memmap(path, dtype=np.uint8 if ml.itemsize == 1 else np.uint16, mode="r",
                           offset=base + start, shape=tuple(info["shape"]))
            return np.asarray(mm[index]).view(ml)
        if len(index) == 0:
            return np.asarray(self._handles[path].get_tensor(name))
        return np.asarray(sl[index])
