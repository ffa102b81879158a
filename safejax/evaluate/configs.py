"""Configs of ``safejax eval score | prefs | arena | elo`` (one dataclass per command, :data:`CONFIGS`)."""

from __future__ import annotations

import dataclasses

from safejax.config import ConfigError, check_range
from safejax.evaluate.generate import SCORE_INPUTS, parse_named_path
from safejax.generation import SamplingConfig
from safejax.parallel import MeshConfig


@dataclasses.dataclass
class EvalBase:
    out_dir: str = "runs/eval"
    seed: int = 42
    batch_size: int = 32              # rows per jitted call; a multiple of mesh data x fsdp
    dtype: str = "float32"            # compute dtype of every model: float32 | bfloat16
    tokenizer: str = ""               # tokenizer folder for every model (default: each model's own folder)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    bins: int = 40                    # histogram bins
    progress: bool = True

    def validate(self) -> None:
        check_range("batch_size", self.batch_size, low=1)
        check_range("dtype", self.dtype, choices=("float32", "bfloat16"))
        check_range("bins", self.bins, low=1)
        if not self.out_dir:
            raise ConfigError("config key 'out_dir' must not be empty")


@dataclasses.dataclass
class GenerationEvalBase(EvalBase):
    reward_model: str = ""            # score-model folder (helpfulness)
    cost_model: str = ""              # score-model folder (harmlessness; cost > 0 = unsafe)
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["PKU-SafeRLHF/test"])  # dataset specs
    prompt_width: int = 128           # P: prompts are left-padded to this many tokens (longer ones dropped)
    max_prompts: int = 0              # first N distinct prompts (0 = all)
    keep_fields: list[str] = dataclasses.field(default_factory=lambda: ["kind", "topic", "category"])
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(max_new_tokens=128))
    score_input: str = "auto"         # auto | ids | text (see safejax.evaluate.generate)
    score_max_length: int = 0         # text scoring: token limit (0 = prompt_width + max_new_tokens)
    skip_bad_rows: bool = False

    def validate(self) -> None:
        super().validate()
        check_range("prompt_width", self.prompt_width, low=1)
        check_range("max_prompts", self.max_prompts, low=0)
        check_range("score_input", self.score_input, choices=SCORE_INPUTS)
        check_range("score_max_length", self.score_max_length, low=0)
        check_range("sampling.num_return_sequences", self.sampling.num_return_sequences, low=1, high=1)
        if not self.prompts:
            raise ConfigError("config key 'prompts' needs at least one dataset spec")

    def require_score_models(self) -> None:
        for key in ("reward_model", "cost_model"):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required (a score-model folder)")


@dataclasses.dataclass
class ScoreEvalConfig(GenerationEvalBase):
    out_dir: str = "runs/eval/score"
    policy: str = ""                  # one policy folder ("name=path" or a path)
    policies: list[str] = dataclasses.field(default_factory=list)   # more policies, same format

    def validate(self) -> None:
        super().validate()
        if not self.policy and not self.policies:
            raise ConfigError("config key 'policy' (or 'policies') is required: the policy folder(s) to score")
        self.require_score_models()

    def named_policies(self) -> list[tuple[str, str]]:
        entries = ([("policy", self.policy)] if self.policy else []) + [
            (f"policies[{i}]", p) for i, p in enumerate(self.policies)]
        return _unique_names([parse_named_path(p, k) for k, p in entries])


@dataclasses.dataclass
class ArenaEvalConfig(GenerationEvalBase):
    out_dir: str = "runs/eval/arena"
    red: str = ""                     # "name=path" or a path: the baseline
    blue: str = ""                    # "name=path" or a path: the challenger

    def validate(self) -> None:
        super().validate()
        for key in ("red", "blue"):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required ('name=path' or a policy folder)")
        self.require_score_models()

    def named_policies(self) -> list[tuple[str, str]]:
        return _unique_names([parse_named_path(self.red, "red"), parse_named_path(self.blue, "blue")])


@dataclasses.dataclass
class EloEvalConfig(GenerationEvalBase):
    out_dir: str = "runs/eval/elo"
    policies: list[str] = dataclasses.field(default_factory=list)   # "name=path" entries (judge=models)
    anchor: str = ""                  # baseline policy name (default: the first one)
    judge: str = "models"             # models | file:<verdicts.jsonl or folder>
    n_boot: int = 200
    ci: float = 0.95
    cluster: str = "prompt"           # bootstrap resamples whole prompts (or single judgements)
    l2: float = 1e-2                  # ridge on log-strengths (see safejax.evaluate.elo)
    tie_tol: float = 0.0              # judge=models: |score difference| <= tie_tol is a tie
    anchor_rating: float = 1000.0
    scale: float = 400.0

    def validate(self) -> None:
        super().validate()
        check_range("n_boot", self.n_boot, low=1)
        check_range("ci", self.ci, low=0.0, high=1.0, low_open=True)
        check_range("cluster", self.cluster, choices=("prompt", "judgement"))
        check_range("l2", self.l2, low=0.0)
        check_range("tie_tol", self.tie_tol, low=0.0)
        check_range("scale", self.scale, low=0.0, low_open=True)
        if self.judge == "models":
            if len(self.policies) < 2:
                raise ConfigError("config key 'policies' needs at least two 'name=path' entries for judge=models")
            self.require_score_models()
        elif not self.judge.startswith("file:") or not self.judge[5:].strip():
            raise ConfigError(f"config key 'judge' = {self.judge!r} must be 'models' or 'file:<path>'")

    def named_policies(self) -> list[tuple[str, str]]:
        return _unique_names([parse_named_path(p, f"policies[{i}]") for i, p in enumerate(self.policies)])


@dataclasses.dataclass
class PrefsEvalConfig(EvalBase):
    out_dir: str = "runs/eval/prefs"
    reward_model: str = ""
    cost_model: str = ""
    data: list[str] = dataclasses.field(default_factory=lambda: ["PKU-SafeRLHF/test"])  # preference split specs
    max_length: int = 512
    skip_bad_rows: bool = False
    column: str = "accuracy"          # column name of the Table-1 layout (e.g. the model version)

    def validate(self) -> None:
        super().validate()
        check_range("max_length", self.max_length, low=2)
        if not self.reward_model and not self.cost_model:
            raise ConfigError("config keys 'reward_model' / 'cost_model': give at least one score-model folder")
        if not self.data:
            raise ConfigError("config key 'data' needs at least one preference dataset spec")


CONFIGS = {"score": ScoreEvalConfig, "prefs": PrefsEvalConfig, "arena": ArenaEvalConfig, "elo": EloEvalConfig}


def _unique_names(named: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for name, path in named:
        if name in seen:
            raise ConfigError(f"policy name {name!r} is used twice ({seen[name]!r} and {path!r}); "
                              "name them with 'name=path'")
        seen[name] = path
    return named
