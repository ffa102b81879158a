"""LoRA adapters on the model's :class:`~safejax.models.llama.Dense` layers, and the split of a LoRA model's
params into what is trained and the frozen base it shares.

A targeted ``Dense`` with kernel ``[*in, *out]`` gains ``lora`` (:class:`LoRAAdapter`)::

    y = x @ kernel (+ bias) + (alpha / rank) * (dropout(x) @ lora_a) @ lora_b
    lora_a [*in, r]   logical axes (*kernel in-axes, "lora_rank")   init uniform(+-1/sqrt(fan_in)) (PEFT's default)
    lora_b [r, *out]  logical axes ("lora_rank", *kernel out-axes)  init zeros: the adapter starts as a no-op

Under ``scan_layers`` both carry the stacked leading ``[L]`` axis (``layers``) like the kernel.  Dropout
(``LoRAConfig.dropout > 0``) adds two per-adapter leaves, ``drop_key`` (raw key data) and ``drop_rate``, that
are never trained nor saved: :meth:`LoRADef.merge` fills them from the state's rng in a training step and with
rate 0 (dropout off, exactly) everywhere else.

Why our own and not ``flax.nnx.LoRA`` / qwix: ``nnx.LoRA`` contracts one input axis into one output axis,
without alpha scaling or dropout, while our Dense contracts several axes with logical-axis names
(``q_proj [D, H, hd]``, ``o_proj [H, hd, D]``) inside a scanned layer stack; qwix (0.1.x) intercepts flax's
own Linear/Einsum modules and would add a dependency for about a hundred lines of code.

The trained/frozen split (:class:`LoRADef`) is by path: adapter leaves (``.../lora/lora_a``) and the
``heads`` (a critic's ``score_head``) are trained; every other param is the frozen *base*, which the PPO
stage keeps once and shares (the actor's base is also the reference policy; a critic's base is its
reward/cost model).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from safejax import parallel
from safejax.config import ConfigError, check_range
from safejax.models.functional import ModelDef, split_model
from safejax.models.hf_names import variable_sharding_names
from safejax.models.llama import Dense

Array = jax.Array
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER = "lora"                     # the attribute of a Dense that holds its adapter
DROPOUT_LEAVES = ("drop_key", "drop_rate")


@dataclasses.dataclass
class LoRAConfig:
    """LoRA of one model.

    Attributes:
      rank: adapter rank r; 0 = full fine-tuning (no adapter, the model is unchanged).
      alpha: the adapter output is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input in training steps (0 = none; never at rollout/eval).
      targets: which Dense layers get an adapter, matched against the module path (e.g.
        ``model.layers.3.self_attn.q_proj``): a pattern matches a path that ends with ``.<pattern>``
        (PEFT's ``target_modules`` rule) or that the pattern, as a regular expression, matches in full.
        Default: the attention projections ``q_proj, k_proj, v_proj, o_proj``.  A critic's ``score_head`` is
        never adapted (it is trained in full).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))

    def check(self, prefix: str) -> None:
        """Range checks, errors naming ``<prefix>.<field>`` (called by :meth:`LoRARoles.validate`)."""
        check_range(f"{prefix}.rank", self.rank, low=0)
        check_range(f"{prefix}.alpha", self.alpha, low=0.0, low_open=True)
        check_range(f"{prefix}.dropout", self.dropout, low=0.0, high=1.0)
        if self.dropout >= 1.0:
            raise ConfigError(f"config key '{prefix}.dropout' = {self.dropout} must be below 1")
        if self.rank and not self.targets:
            raise ConfigError(f"config key '{prefix}.targets' is empty but '{prefix}.rank' = {self.rank}")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"config key '{prefix}.targets': {t!r} is not a valid pattern ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass
class LoRARoles:
    """The RL stage's ``lora:`` section: one :class:`LoRAConfig` per trained model (rank 0 = full fine-tuning).

    Attributes:
      actor: LoRA of the policy; its frozen base is also the reference policy (no second copy).
      reward_critic: LoRA of the reward critic, built on the reward model's frozen backbone (shared, not
        copied) with its own trainable ``score_head`` (started from the reward model's); needs
        ``reward_critic`` empty or equal to ``reward_model``.
      cost_critic: the same for the cost critic on the cost model.  Both critics share one optimizer, so
        with PPO-Lag they are either both LoRA (same rank and targets) or both fully fine-tuned.
    """

    actor: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    reward_critic: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    cost_critic: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def validate(self) -> None:
        for role in ("actor", "reward_critic", "cost_critic"):
            getattr(self, role).check(f"lora.{role}")

    def check_roles(self, cfg) -> None:
        """Checks against the RL config ``cfg`` (``reward_critic``/``cost_critic`` paths, algorithm)."""
        for role, model in (("reward_critic", "reward_model"), ("cost_critic", "cost_model")):
            if getattr(self, role).rank and getattr(cfg, role) not in ("", getattr(cfg, model)):
                raise ConfigError(f"config key 'lora.{role}.rank' = {getattr(self, role).rank}: a LoRA {role} is "
                                  f"built on {model}'s frozen backbone, so '{role}' must be empty or equal to "
                                  f"'{model}' (got {getattr(cfg, role)!r})")
        rc, cc = self.reward_critic, self.cost_critic
        if cfg.algorithm == "ppo-lag" and (rc.rank, rc.targets) != (cc.rank, cc.targets):
            raise ConfigError(f"config key 'lora.cost_critic' (rank {cc.rank}, targets {cc.targets}) must match "
                              f"'lora.reward_critic' (rank {rc.rank}, targets {rc.targets}): both critics share "
                              "one optimizer")

    @property
    def any(self) -> bool:
        return bool(self.actor.rank or self.reward_critic.rank or self.cost_critic.rank)


class LoRAParam(nnx.Param):
    """An adapter weight (``lora_a`` / ``lora_b``)."""


class LoRADropout(nnx.Variable):
    """Dropout key data / rate of an adapter: filled at merge time, never trained or saved."""


def _key_shape() -> tuple[int, ...]:
    return jax.random.key_data(jax.random.key(0)).shape


class LoRAAdapter(nnx.Module):
    """``(alpha/r) * (dropout(x) @ a) @ b`` for a Dense with kernel ``[*lead, *in, *out]`` (``lead`` = ``(L,)``
    in a scanned layer stack, else ``()``)."""

    def __init__(self, lead, in_shape, out_shape, names, cfg: LoRAConfig, *, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs):
        lead, in_shape, out_shape = tuple(lead), tuple(in_shape), tuple(out_shape)
        names = tuple(names) if names else (None,) * (len(lead) + len(in_shape) + len(out_shape))
        nl, ni = len(lead), len(in_shape)
        lead_n, in_n, out_n = names[:nl], names[nl:nl + ni], names[nl + ni:]
        r = int(cfg.rank)
        self.n_in = ni
        self.scale = float(cfg.scale)
        self.dtype = jnp.dtype(dtype).name
        self.dropout = float(cfg.dropout)
        bound = 1.0 / math.sqrt(math.prod(in_shape))

        def uniform(key, shape, dtype):  # U(-bound, bound): torch's kaiming_uniform(a=sqrt(5)), PEFT's lora_A init
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        a_init = nnx.with_partitioning(uniform, lead_n + in_n + ("lora_rank",))
        b_init = nnx.with_partitioning(nnx.initializers.zeros, lead_n + ("lora_rank",) + out_n)
        pd = jnp.dtype(param_dtype)
        self.lora_a = LoRAParam(a_init(rngs.params(), lead + in_shape + (r,), pd))
        self.lora_b = LoRAParam(b_init(rngs.params(), lead + (r,) + out_shape, pd))
        if self.dropout > 0:
            self.drop_key = LoRADropout(jnp.zeros(lead + _key_shape(), jnp.uint32))
            self.drop_rate = LoRADropout(jnp.zeros(lead, jnp.float32))
        else:
            self.drop_key = self.drop_rate = None

    def __call__(self, x: Array) -> Array:
        """x ``[..., *in]`` -> ``[..., r]`` -> ``[..., *out]`` scaled by alpha/r (compute dtype)."""
        dt = jnp.dtype(self.dtype)
        x = x.astype(dt)
        if self.drop_key is not None:  # rate 0 keeps every element and divides by 1: exactly x
            rate = self.drop_rate[...]
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.drop_key[...]), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate).astype(dt), jnp.zeros((), dt))
        h = jnp.tensordot(x, self.lora_a[...].astype(dt), axes=self.n_in)
        return jnp.tensordot(h, self.lora_b[...].astype(dt), axes=1) * jnp.asarray(self.scale, dt)


def matches(path: str, targets) -> bool:
    """Whether the module path is targeted (see :attr:`LoRAConfig.targets`)."""
    return any(path == t or path.endswith("." + t) or re.fullmatch(t, path) for t in targets)


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, what: str = "lora") -> nnx.Module:
    """Attach an adapter to every targeted Dense of ``model`` (in place; returns it).  Works under
    ``nnx.eval_shape``.  A ``cfg.rank`` of 0 leaves the model untouched.  No match: :class:`ConfigError`
    naming ``<what>.targets``."""
    if not cfg.rank:
        return model
    with nnx.use_eager_sharding(False):  # placed on their shardings later, by the state builder
        return _add_lora(model, cfg, seed, what)


def _add_lora(model: nnx.Module, cfg: LoRAConfig, seed: int, what: str) -> nnx.Module:
    config = model.config
    rngs = nnx.Rngs(params=seed)
    found = []
    for path, mod in list(nnx.iter_modules(model)):
        name = ".".join(str(p) for p in path)
        if not isinstance(mod, Dense) or path[-1] == "score_head" or not matches(name, cfg.targets):
            continue
        shape = tuple(mod.kernel.shape)
        lead = shape[:1] if config.scan_layers and name.startswith("model.layers.") else ()
        n_out = len(shape) - len(lead) - mod.n_in
        in_shape, out_shape = shape[len(lead):len(lead) + mod.n_in], shape[len(shape) - n_out:]
        names = variable_sharding_names(mod.kernel)
        setattr(mod, ADAPTER, LoRAAdapter(lead, in_shape, out_shape, names, cfg, dtype=mod.dtype,
                                          param_dtype=config.param_dtype, rngs=rngs))
        found.append(name)
    if not found:
        raise ConfigError(f"config key '{what}.targets' = {list(cfg.targets)} matches no layer of the model "
                          f"(paths look like 'model.layers.0.self_attn.q_proj')")
    return model


# ----------------------------------------------------------------------------- trained / frozen split


def _is_adapter(path: tuple) -> bool:
    return ADAPTER in path


def _is_dropout(path: tuple) -> bool:
    return ADAPTER in path and path[-1] in DROPOUT_LEAVES


@dataclasses.dataclass(frozen=True, eq=False)
class LoRADef:
    """A LoRA model: ``full`` (with adapters) and ``base`` (the plain model) definitions, and which
    top-level ``heads`` are trained in full.  Trained params: the adapters + heads; base params: the plain
    model's (a score model's head included: :meth:`merge` overrides it with the trained one)."""

    full: ModelDef
    base: ModelDef
    cfg: LoRAConfig
    heads: tuple[str, ...] = ()

    def _trained(self, path: tuple) -> bool:
        return (_is_adapter(path) and not _is_dropout(path)) or path[0] in self.heads

    def trained_params(self, full_params: dict) -> dict:
        """The trained subset (adapters + heads) of a params dict of :attr:`full`."""
        flat = flatten_dict(full_params)
        return unflatten_dict({k: v for k, v in flat.items() if self._trained(k)})

    def merge(self, trained: dict, base: dict, key: Array | None = None) -> nnx.Module:
        """The module over ``base`` params (the plain model's dict) and ``trained`` (adapters + heads).
        ``key`` (training steps): each adapter's dropout gets its own key folded from it (per layer too);
        None: dropout off."""
        flat = {k: v for k, v in flatten_dict(base).items() if k[0] not in self.heads}
        flat.update(flatten_dict(trained))
        abstract = flatten_dict(self.full.abstract_params())
        for i, k in enumerate(sorted((k for k in abstract if _is_dropout(k) and k[-1] == "drop_key"), key=str)):
            shape = abstract[k].shape
            lead = shape[:len(shape) - len(_key_shape())]
            rate_k = k[:-1] + ("drop_rate",)
            if key is None:
                flat[k] = jnp.zeros(shape, jnp.uint32)
                flat[rate_k] = jnp.zeros(lead, jnp.float32)
            else:
                sub = jax.random.fold_in(key, i)
                keys = jax.random.split(sub, math.prod(lead)) if lead else sub
                flat[k] = jax.random.key_data(keys).reshape(shape)
                flat[rate_k] = jnp.full(lead, self.cfg.dropout, jnp.float32)
        return self.full.merge(unflatten_dict(flat))

    def shardings(self, mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> dict:
        """NamedShardings of the trained params (the adapters on their logical axes, through ``rules``)."""
        return self.trained_params(self.full.shardings(mesh, rules))

    def hf_names(self) -> dict:
        """HF-style names shaped like the trained params (for the weight-decay rule): adapters are named like
        PEFT's ``...q_proj.lora_A.weight`` (they decay), heads keep theirs."""
        names = flatten_dict(self.full.abstract_params())
        out = {}
        for k in names:
            if not self._trained(k):
                continue
            if _is_adapter(k):
                i = k.index(ADAPTER)
                out[k] = ".".join(map(str, k[:i])) + {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}[k[-1]]
            else:
                out[k] = ".".join(map(str, k[:-1])) + ("." + {"kernel": "weight"}.get(k[-1], k[-1]))
        return unflatten_dict(out)

    def merged_params(self, trained: dict, base: dict) -> dict:
        """The plain model's params with every adapter folded in: ``W + (alpha/r) * a @ b`` (float32, then the
        kernel's dtype), heads from ``trained``."""
        flat = flatten_dict(base)
        tflat = flatten_dict(trained)
        for k, v in tflat.items():
            if k[0] in self.heads:
                flat[k] = v
        for k, a in tflat.items():
            if not (_is_adapter(k) and k[-1] == "lora_a"):
                continue
            i = k.index(ADAPTER)
            kern = k[:i] + ("kernel",)
            b = tflat[k[:-1] + ("lora_b",)]
            w = flat[kern]
            lead = a.ndim + b.ndim - 2 - w.ndim  # a [*l, *in, r], b [*l, r, *out], w [*l, *in, *out]
            delta = _delta(a, b, lead)
            flat[kern] = (w.astype(jnp.float32) + self.cfg.scale * delta).astype(w.dtype)
        return unflatten_dict(flat)


def base_def(mdef: ModelDef | LoRADef) -> ModelDef:
    """The plain model's definition (a LoRA model's frozen base; a plain model's own)."""
    return mdef.base if isinstance(mdef, LoRADef) else mdef


def merge_role(mdef: ModelDef | LoRADef, params: dict, base: dict | None = None, key: Array | None = None):
    """The module of a trained role: a plain model from its own params, a LoRA model from its trained params
    over the shared frozen ``base`` (dropout keyed by ``key``; None = off)."""
    if isinstance(mdef, LoRADef):
        return mdef.merge(params, base, key)
    return mdef.merge(params)


def lora_model(mdef: ModelDef, params: dict, cfg: LoRAConfig, *, seed: int, what: str,
               heads: tuple[str, ...] = ()) -> tuple[LoRADef, dict]:
    """``(LoRADef, trained params)`` of a loaded plain model ``(mdef, params)``: adapters initialised from
    ``seed``; ``heads`` trained in full start as copies of the model's (the frozen base keeps its own)."""
    module = add_lora(mdef.merge(params), cfg, seed=seed, what=what)
    fdef, fparams = split_model(module)
    ldef = LoRADef(fdef, mdef, cfg, tuple(heads))
    trained = ldef.trained_params(fparams)
    trained = {k: (jax.tree.map(jnp.copy, v) if k in heads else v) for k, v in trained.items()}
    return ldef, trained


def _delta(a: Array, b: Array, lead: int) -> Array:
    """``a [*l, *in, r] @ b [*l, r, *out]`` -> ``[*l, *in, *out]`` float32."""
    f = lambda x, y: jnp.tensordot(x.astype(jnp.float32), y.astype(jnp.float32), axes=1)  # noqa: E731
    for _ in range(lead):
        f = jax.vmap(f)
    return f(a, b)
