"""The RL stage's config: ``safejax ppo-lag | ppo | ppo-reward-shaping --config ...`` reads a :class:`PPOConfig`.

Sections of their own here (``data``, ``ppo``); shared ones from :mod:`safejax.sections`,
:mod:`safejax.generation` (``rollout``), :mod:`safejax.train.lagrange_stage` (``lagrange``: K constraints, the
multiplier rule), :mod:`safejax.models.lora` (``lora``), :mod:`safejax.train.optim` (the two optimizers) and
:mod:`safejax.parallel` (``mesh``).  ``safejax ppo-lag --print-config`` lists every key with its value.
"""

from __future__ import annotations

import dataclasses

from safejax.config import ConfigError, check_range
from safejax.generation import SamplingConfig
from safejax.models.lora import LoRARoles
from safejax.parallel import MeshConfig
from safejax.sections import ExportSection, LoopSection, ModelSection
from safejax.train.lagrange_stage import LagrangeSection
from safejax.train.optim import OptimConfig

ALGORITHMS = ("ppo-lag", "ppo", "ppo-reward-shaping")


@dataclasses.dataclass
class PPODataSection:
    prompts: list[str] = dataclasses.field(default_factory=list)      # dataset specs of prompt rows
    ptx: list[str] = dataclasses.field(default_factory=list)          # supervised specs (empty = no ptx)
    eval_prompts: list[str] = dataclasses.field(default_factory=list)  # held-out prompts: eval/reward, eval/cost
                                                                       # every train.eval_every iterations + at the end
    prompt_width: int = 64
    # the reference's response budget: prompt + response <= max_length, prompts left-padded to the batch's longest,
    # so a response may use max_length - longest prompt tokens.  0: a fixed rollout.max_new_tokens after the fixed
    # prompt_width.  With max_length > 0 a batch runs in the narrowest bucket of prompt_buckets (+ prompt_width)
    # that holds its longest prompt -- one compile of the rollout and the update per bucket -- and every response
    # is cut at max_length - longest, as in the reference; prompts longer than prompt_width are dropped and counted
    max_length: int = 0
    prompt_buckets: list[int] = dataclasses.field(default_factory=list)
    ptx_max_length: int = 128
    skip_bad_rows: bool = False
    ptx_pack: bool = False             # pack several ptx examples per row (safejax.data.packing); same token loss

    def validate(self) -> None:
        """The prompt geometry (the RL stages share it: PPO family and GRPO family)."""
        d = self
        if d.max_length and d.max_length <= d.prompt_width:
            raise ConfigError(f"config key 'data.max_length' = {d.max_length} must exceed 'data.prompt_width' = "
                              f"{d.prompt_width} (it counts prompt and response tokens), or be 0")
        if any(not 0 < w < d.prompt_width for w in d.prompt_buckets):
            raise ConfigError(f"config key 'data.prompt_buckets' = {d.prompt_buckets}: every width must be in "
                              f"(0, data.prompt_width = {d.prompt_width}); prompt_width is always the widest bucket")


@dataclasses.dataclass
class PPOSection:
    kl_coeff: float = 0.01
    clip_range_ratio: float = 0.2
    clip_range_score: float = 50.0
    clip_range_value: float = 5.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    update_iters: int = 1
    micro_batch_size: int = 16        # rows per mini-batch update (M)
    ptx_coeff: float = 16.0
    # unit of the ptx token mean: 0 = one mean over the ptx micro-batch; n = the reference's (a token mean per n
    # rows -- its per-rank micro-batch, per_device_train_batch_size -- then the mean over those groups)
    ptx_token_mean_rows: int = 0
    # [code] mask_t = (x_t != pad) and (x_t != unk): a pad or unk token the actor *samples* inside a response
    # is masked out of the experience (log-probs, values, end-score index), as in the reference.  False keeps
    # every generated token up to EOS.
    mask_sampled_special: bool = True

    def validate(self) -> None:
        check_range("ppo.kl_coeff", self.kl_coeff, low=0.0)
        check_range("ppo.clip_range_ratio", self.clip_range_ratio, low=0.0, low_open=True)
        check_range("ppo.gamma", self.gamma, low=0.0, high=1.0)
        check_range("ppo.gae_lambda", self.gae_lambda, low=0.0, high=1.0)
        check_range("ppo.update_iters", self.update_iters, low=1)
        check_range("ppo.micro_batch_size", self.micro_batch_size, low=1)
        check_range("ppo.ptx_coeff", self.ptx_coeff, low=0.0)
        check_range("ppo.ptx_token_mean_rows", self.ptx_token_mean_rows, low=0)


@dataclasses.dataclass
class PPOConfig:
    algorithm: str = "ppo-lag"
    out_dir: str = "runs/ppo-lag"
    seed: int = 42
    actor: ModelSection = dataclasses.field(default_factory=ModelSection)   # the SFT policy (also the reference)
    reward_model: str = ""
    cost_model: str = ""
    reward_critic: str = ""           # default: reward_model (critic starts from the RM head)
    cost_critic: str = ""             # default: cost_model
    data: PPODataSection = dataclasses.field(default_factory=PPODataSection)
    rollout: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    lagrange: LagrangeSection = dataclasses.field(default_factory=LagrangeSection)
    actor_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.01))
    critic_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=5e-6, schedule="constant", warmup_ratio=0.03, weight_decay=0.0))
    train: LoopSection = dataclasses.field(default_factory=LoopSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    allow_config_change: bool = False
    export: ExportSection = dataclasses.field(default_factory=ExportSection)  # export.dtype of out_dir/hf (actor)
    lora: LoRARoles = dataclasses.field(default_factory=LoRARoles)  # lora.{actor,reward_critic,cost_critic}.rank...

    def validate(self) -> None:
        check_range("algorithm", self.algorithm, choices=ALGORITHMS)
        if self.train.batch_size % self.ppo.micro_batch_size:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'ppo.micro_batch_size' = {self.ppo.micro_batch_size}")
        if self.ppo.ptx_token_mean_rows and self.ppo.micro_batch_size % self.ppo.ptx_token_mean_rows:
            raise ConfigError(f"config key 'ppo.ptx_token_mean_rows' = {self.ppo.ptx_token_mean_rows} must divide "
                              f"'ppo.micro_batch_size' = {self.ppo.micro_batch_size}")
        if self.train.batch_size % self.rollout.num_return_sequences:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'rollout.num_return_sequences' = {self.rollout.num_return_sequences}")
        self.lora.check_roles(self)
        for key in ("reward_model",) + (("cost_model",) if self.algorithm != "ppo" else ()):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required for algorithm '{self.algorithm}'")
