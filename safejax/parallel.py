"""Device mesh, the logical-axis rules table, and sharding helpers.

Model code annotates every parameter with *logical* axis names (``embed``, ``vocab``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``norm``).  This module owns the one table that
maps those names onto the *physical* mesh axes ``("data", "fsdp", "tensor")``.  Changing the
parallelism strategy means editing :data:`LOGICAL_AXIS_RULES` (or overriding entries of it from a config's
``mesh.rules``), never the model.

Activations follow the same table: model code pins the residual stream with
``constrain(h, ("batch", "length", "embed"))`` (batch over ``data`` x ``fsdp``), which takes effect
inside functions compiled with :func:`mesh_jit`.  Inputs too: :func:`host_local_to_global` places a
batch by the logical names of its leading axes (``("batch",)``, or ``("accum", "batch")`` for
micro-batches).

A run may override entries of the table from its config (``mesh.rules``, see :class:`MeshConfig`).
The resolved table (:func:`resolve_rules`) is made where the stage makes its mesh and passed on
explicitly beside it: to :func:`use_mesh` (parameters created sharded), :func:`state_shardings`,
:func:`host_local_to_global` and :func:`mesh_jit`, which installs it as Flax's logical-axis context
while tracing so that the models' :func:`constrain` calls follow it.  Nothing mutates the default
table.

Typical use::

    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    with use_mesh(mesh, rules):
        model = CausalLM(cfg, rngs=nnx.Rngs(0))            # params created already sharded
    param_shardings = state_shardings(nnx.state(model), mesh, rules)   # from the logical-axis annotations
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    step = mesh_jit(step_fn, mesh=mesh, rules=rules, in_shardings=..., donate_argnums=0)  # activations too
    batch = host_local_to_global(host_rows, mesh, rules)                  # rows split by the "batch" rule
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from safejax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> physical mesh axis (or a tuple of axes, or None = replicated).
# Activations: "batch" is split over data *and* fsdp (FSDP shards the batch too).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("score", None),
    ("length", None),
    ("constraints", None),
    ("lora_rank", None),           # LoRA adapters' rank axis (safejax.models.lora): small, replicated
    ("accum", None),  # the gradient-accumulation axis of a micro-batched input [accum, micro, ...]
)

Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass
class MeshConfig:
    """The device mesh of a run and its overrides of the logical-axis rules table.

    Attributes:
      data: size of the ``data`` axis (pure data parallelism).
      fsdp: size of the ``fsdp`` axis (parameters and optimizer state sharded, batch split too).
      tensor: size of the ``tensor`` axis (heads / MLP / vocabulary split).  Exactly one of the three may
        be ``-1`` (= all remaining devices).
      rules: overrides of entries of :data:`LOGICAL_AXIS_RULES`, a mapping from a logical axis name to the
        mesh axes it is split over: ``null`` (replicated), one mesh axis, or a list of mesh axes (split over
        their product, in that order).  Names not given keep the table's entry.  YAML example:
        ``mesh: {rules: {mlp: null, embed: [fsdp], batch: [data, fsdp]}}``; on the command line
        ``mesh.rules.mlp=null``.  Checked when the config is read: an unknown logical name, an unknown mesh
        axis or a mesh axis named twice in one rule is a ConfigError naming ``mesh.rules.<name>``.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        resolve_rules(self)  # a bad rule fails when the config is read, before a run writes anything


def resolve_rules(cfg: MeshConfig | None) -> Rules:
    """:data:`LOGICAL_AXIS_RULES` with the entries of ``cfg.rules`` replaced (the table itself when there are none).

    Values are normalised like the table's: ``None``, one axis name, or a tuple of axis names."""
    overrides = {} if cfg is None or cfg.rules is None else cfg.rules
    if not isinstance(overrides, dict):
        raise ConfigError(f"config key 'mesh.rules': expected a mapping from logical axis to mesh axes, "
                          f"got {overrides!r}")
    if not overrides:
        return LOGICAL_AXIS_RULES
    table = dict(LOGICAL_AXIS_RULES)
    for name, value in overrides.items():
        key = f"mesh.rules.{name}"
        if name not in table:
            raise ConfigError(f"config key '{key}': unknown logical axis {name!r}; known: {', '.join(table)}")
        axes = () if value is None else (value,) if isinstance(value, str) else value
        if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
            raise ConfigError(f"config key '{key}': expected null, a mesh axis or a list of mesh axes, got {value!r}")
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(f"config key '{key}': unknown mesh axis {a!r}; mesh axes: {', '.join(MESH_AXES)}")
        twice = sorted({a for a in axes if list(axes).count(a) > 1})
        if twice:
            raise ConfigError(f"config key '{key}': mesh axis {twice[0]!r} is named twice in one rule")
        table[name] = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return tuple(table.items())


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(1 for s in sizes if s == -1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh: axis '{name}' has invalid size {s} (use a positive size or -1)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes product {known} "
                             f"(data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor})")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {num_devices} devices "
                         f"(data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}); use -1 for one axis")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh with Auto axis types over ``devices`` (default: all)."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    fixed = [s for s in (cfg.data, cfg.fsdp, cfg.tensor)]
    if -1 not in fixed and int(np.prod(fixed)) < len(devices):
        devices = devices[: int(np.prod(fixed))]  # an explicit smaller mesh uses the first devices
    shape = resolve_mesh_shape(cfg, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Context in which Flax NNX creates parameters already sharded by the logical rules."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(list(rules)):
        yield mesh


def logical_to_spec(names: Sequence[str | None] | None, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
                    mesh: Mesh | None = None) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per array.

    Axes of size 1 in ``mesh`` are dropped (they shard nothing)."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        phys = table.get(name) if name is not None else None
        if phys is None:
            out.append(None)
            continue
        axes = (phys,) if isinstance(phys, str) else tuple(phys)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the corresponding dimension (e.g. vocab 99 on tensor=2)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in tup]))
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def sharding_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding for an array of ``shape`` annotated with logical ``names``."""
    return NamedSharding(mesh, _fits(shape, logical_to_spec(names, rules, mesh), mesh))


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """Shardings for an NNX state (``nnx.State``) from each Variable's ``sharding_names`` metadata.

    Leaves without annotations are replicated."""
    def one(x):
        names = None
        if isinstance(x, nnx.Variable):
            meta = x.get_metadata() if hasattr(x, "get_metadata") else {}
            names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
            arr = x.get_value() if hasattr(x, "get_value") else x[...]
        else:
            arr = x
        return sharding_for(np.shape(arr), names, mesh, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- activations

try:  # public in the jax versions we support (0.10 - 0.12); the private paths are a fallback only
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer
_use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
if _use_abstract_mesh is None:  # pragma: no cover
    from jax._src.mesh import use_abstract_mesh as _use_abstract_mesh


def current_rules() -> Rules:
    """The rules table installed by :func:`mesh_jit` / :func:`use_mesh` (Flax's logical-axis context) for the
    code running now, else :data:`LOGICAL_AXIS_RULES`."""
    rules = flax_spmd.get_logical_axis_rules()
    return tuple((k, v) for k, v in rules) if rules else LOGICAL_AXIS_RULES


def constrain(x: jax.Array, names: Sequence[str | None],
              rules: Sequence[tuple[str, Any]] | None = None) -> jax.Array:
    """Pin an activation's sharding by *logical* axis names (e.g. ``("batch", "length", "embed")``).

    Applies only while tracing under a mesh (:func:`mesh_jit`, or ``jax.set_mesh``); a no-op on one
    device, in eager code, and for axes that do not divide the dimension.  Without these pins XLA's
    propagation follows the FSDP-sharded weights and can leave the batch unsplit with the hidden
    dimension sharded instead (every device then computes the whole batch).  Model code calls this;
    only the rules table knows the physical axes: ``rules`` default to the table :func:`mesh_jit` traces
    under (:func:`current_rules`)."""
    if not isinstance(x, _Tracer):
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = _fits(x.shape, logical_to_spec(names, current_rules() if rules is None else rules, mesh), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_jit(fn=None, *, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, **jit_kwargs):
    """``jax.jit`` whose function traces under ``mesh`` (as an abstract mesh) and the logical-axis ``rules``
    (as Flax's logical-axis context), so that :func:`constrain` pins activations inside it by those rules.
    Use as ``mesh_jit(fn, mesh=m, rules=r, donate_argnums=0)`` or as a decorator ``@mesh_jit(mesh=m)``."""
    if fn is None:
        return functools.partial(mesh_jit, mesh=mesh, rules=rules, **jit_kwargs)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with _use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(list(rules)):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def input_names(ndim: int, axes: Sequence[str | None] = ("batch",)) -> tuple[str | None, ...]:
    """Logical names of an input of rank ``ndim`` whose leading axes are named ``axes`` (the rest unnamed)."""
    return tuple(axes)[:ndim] + (None,) * max(ndim - len(axes), 0)


def input_sharding(mesh: Mesh, ndim: int, axes: Sequence[str | None] = ("batch",),
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of an input array of rank ``ndim`` whose leading axes have the logical names ``axes``
    (default ``("batch",)``: rows placed by the table's ``batch`` rule, other axes replicated).  A micro-batched
    ``[accum, micro, ...]`` leaf is ``axes=("accum", "batch")``.  What :func:`host_local_to_global` places on and
    what a jitted step takes as its batch's ``in_shardings``."""
    return NamedSharding(mesh, logical_to_spec(input_names(ndim, axes), rules, mesh))


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> int:
    """Into how many parts the rules table splits the rows of a batch on ``mesh`` (a batch's size must be a
    multiple of it)."""
    lead = logical_to_spec(("batch",), rules, mesh)[0]
    axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def opt_state_shardings(tx, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for ``tx.init(params)``: moments follow their parameter, everything else replicated.

    ``jax.jit(tx.init)`` alone would leave the moments replicated (XLA does not propagate them); pass the result of
    this function as ``out_shardings``.  Any subtree of the optimizer state whose tree structure
    equals the params' (Adam's ``mu`` and ``nu``, ...) gets the params' shardings; all other leaves
    (counts, schedule states) are replicated on the mesh."""
    abstract = jax.eval_shape(tx.init, params)
    params_def = jax.tree.structure(params)
    shard_leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    rep = NamedSharding(mesh, P())

    def walk(node):
        if isinstance(node, jax.ShapeDtypeStruct):
            return rep
        if jax.tree.structure(node) == params_def:
            return jax.tree.unflatten(params_def, shard_leaves)
        children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        return jax.tree.unflatten(treedef, [walk(c) for c in children])

    return walk(abstract)


# ----------------------------------------------------------------------------- multi-host


def host_local_to_global(batch: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, *,
                         axes: Sequence[str | None] = ("batch",), global_rows: int | None = None) -> Any:
    """The one host -> device batch mover: numpy leaves -> global arrays placed by logical axis names.

    Each leaf's leading axes are named ``axes`` (default ``("batch",)``; ``("accum", "batch")`` for micro-batched
    ``[accum, micro, ...]`` leaves) and placed by ``rules`` (:func:`input_sharding`); a leaf of lower rank
    gets the names that fit (a 0-d leaf is replicated).  Multi-host: by default each host passes its own rows
    (the local slice of the batch axis) and the global row count is inferred from the sharding; ``global_rows``
    gives the batch axis's global size explicitly, e.g. ``global_rows=len(rows)`` when every host holds the
    whole batch (each then fills only its addressable shards).  On one process this is ``jax.device_put``."""

    def one(x):
        x = np.asarray(x)
        names = input_names(x.ndim, axes)
        shape = None
        if global_rows is not None and "batch" in names:
            i = names.index("batch")
            shape = x.shape[:i] + (int(global_rows),) + x.shape[i + 1:]
        return jax.make_array_from_process_local_data(input_sharding(mesh, x.ndim, axes, rules), x, shape)

    return jax.tree.map(one, batch)
