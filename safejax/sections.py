"""Config sections shared by the training stages and the evaluation commands.

``model:``, ``data:``, ``train:`` and ``export:`` of a stage's YAML.  A leaf module (it imports only
:mod:`safejax.config`), so that both ``safejax/train/`` and ``safejax/evaluate/`` can use it.
"""

from __future__ import annotations

import dataclasses

from safejax.config import ConfigError, check_range


@dataclasses.dataclass
class ModelSection:
    path: str = ""                 # HF folder (config.json + *.safetensors)
    tokenizer: str = ""            # tokenizer folder (default: model.path)
    dtype: str = "float32"         # compute dtype: float32 | bfloat16
    remat: bool = False
    scan_layers: bool = False
    attention: str = "einsum"      # full-sequence attention: einsum | xla | cudnn (fused, NVIDIA GPUs, bf16)

    def validate(self) -> None:
        check_range("model.dtype", self.dtype, choices=("float32", "bfloat16"))
        check_range("model.attention", self.attention, choices=("einsum", "xla", "cudnn"))
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ConfigError("config key 'model.attention' = 'cudnn' needs 'model.dtype' = 'bfloat16' "
                              "(cuDNN flash attention has no float32 kernel)")


@dataclasses.dataclass
class DataSection:
    """Datasets of a supervised stage (SFT, RM, CM): specs ``name[:proportion[:path]]``."""

    train: list[str] = dataclasses.field(default_factory=list)
    eval: list[str] = dataclasses.field(default_factory=list)
    max_length: int = 512
    skip_bad_rows: bool = False
    # pack several training examples per row (segment ids; attention stays inside an example, positions restart):
    # same per-example losses and scores, fewer padded tokens.  train.batch_size then counts packed rows
    # (SFT: rows of max_length; RM/CM: rows of 2 x max_length holding whole pairs).  Eval data is not packed.
    pack: bool = False

    def validate(self) -> None:
        check_range("data.max_length", self.max_length, low=2)


@dataclasses.dataclass
class ExportSection:
    """The HF folder a stage writes to ``out_dir/hf`` when it finishes.

    Attributes:
      dtype: dtype of the weights in ``hf/model.safetensors``: ``float32`` (exact) or ``bfloat16`` (half the
        size: about 13.5 GB instead of 27 GB for a 7B policy).  ``safejax export --dtype`` does the same for
        any checkpoint.
    """

    dtype: str = "float32"

    def validate(self) -> None:
        check_range("export.dtype", self.dtype, choices=("float32", "bfloat16"))


@dataclasses.dataclass
class LoopSection:
    epochs: int = 1
    batch_size: int = 16           # global batch (rows) per optimizer update
    max_steps: int = -1            # stop after this many updates (-1 = epochs decide)
    log_every: int = 1
    eval_every: int = 0            # 0 = at the end of each epoch only
    save_every: int = 0            # 0 = only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    progress: bool = True
    skip_nonfinite: bool = False   # True: a step with a NaN/Inf loss or gradient is skipped and counted, not fatal
    max_consecutive_skips: int = 3  # with skip_nonfinite: more skipped steps in a row than this stops the run (exit 2)
    allow_data_change: bool = False  # resume even though the training data differs from the checkpoint's
    inject_nan_step: int = 0       # fault-injection hook for tests: poison this update (1-based) with NaN; 0 = off

    def validate(self) -> None:
        check_range("train.epochs", self.epochs, low=1)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.max_steps", self.max_steps, low=-1)   # -1 / 0: epochs decide
        check_range("train.log_every", self.log_every, low=1)
        check_range("train.eval_every", self.eval_every, low=0)
        check_range("train.save_every", self.save_every, low=0)
        check_range("train.keep_checkpoints", self.keep_checkpoints, low=1)
        check_range("train.inject_nan_step", self.inject_nan_step, low=0)
        check_range("train.max_consecutive_skips", self.max_consecutive_skips, low=1)
