"""Device mesh, the logical-axis rules table, and sharding helpers.

Model code annotates every parameter with *logical* axis names (``embed``, ``vocab``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``norm``).  This module owns the one table that
maps those names onto the *physical* mesh axes ``("data", "fsdp", "tensor")``.  Changing the
parallelism strategy means editing :data:`LOGICAL_AXIS_RULES`, never the model.

Activations follow the same table: model code pins the residual stream with
``constrain(h, ("batch", "length", "embed"))`` (batch over ``data`` x ``fsdp``), which takes effect
inside functions compiled with :func:`mesh_jit`.

Typical use::

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    with use_mesh(mesh):
        model = CausalLM(cfg, rngs=nnx.Rngs(0))            # params created already sharded
    param_shardings = state_shardings(nnx.state(model), mesh)     # from the logical-axis annotations
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    step = mesh_jit(step_fn, mesh=mesh, in_shardings=..., donate_argnums=0)   # activations pinned too
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
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
)


@dataclasses.dataclass
class MeshConfig:
    """Sizes of the three mesh axes; exactly one may be ``-1`` (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


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


def constrain(x: jax.Array, names: Sequence[str | None],
              rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> jax.Array:
    """Pin an activation's sharding by *logical* axis names (e.g. ``("batch", "length", "embed")``).

    Applies only while tracing under a mesh (:func:`mesh_jit`, or ``jax.set_mesh``); a no-op on one
    device, in eager code, and for axes that do not divide the dimension.  Without these pins XLA's
    propagation follows the FSDP-sharded weights and can leave the batch unsplit with the hidden
    dimension sharded instead (every device then computes the whole batch).  Model code calls this;
    only the rules table knows the physical axes."""
    if not isinstance(x, _Tracer):
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = _fits(x.shape, logical_to_spec(names, rules, mesh), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_jit(fn=None, *, mesh: Mesh, **jit_kwargs):
    """``jax.jit`` whose function traces under ``mesh`` (as an abstract mesh), so that :func:`constrain`
    pins activations inside it.  Use as ``mesh_jit(fn, mesh=m, donate_argnums=0)`` or as a decorator
    ``@mesh_jit(mesh=m)``."""
    if fn is None:
        return functools.partial(mesh_jit, mesh=mesh, **jit_kwargs)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with _use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of an input array of rank ``ndim`` whose axis ``batch_axis`` holds rows (logical ``"batch"``,
    placed by the rules table); its other axes are replicated.  ``batch_axis=1`` places a micro-batched
    ``[accum, micro, ...]`` leaf (the micro-batch rows split, the accumulation axis whole)."""
    names = [None] * ndim
    names[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))


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


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
    """Turn this host's rows (leading axis = local slice of the global batch) into global arrays
    sharded along the batch axis over ``data`` x ``fsdp``."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, batch)
