"""Bridging Flax NNX modules and pure jitted steps.

Train states hold parameters as plain nested dicts of arrays (``nnx.State.to_pure_dict()``), which
optax, orbax and ``jax.tree`` handle directly.  :class:`ModelDef` remembers the module's graph
definition and variable template so a pure function can rebuild the module from a params dict:

    mdef, params = split_model(model)
    def loss(params, batch):
        lm = mdef.merge(params)          # inside jit: a module view over traced arrays
        return lm(batch["ids"]).mean()
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from safejax import parallel
from safejax.models.hf_names import hf_param_names


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """Static description of a module: graph definition + variable template (abstract)."""

    graphdef: Any
    template: Any  # nnx.State with ShapeDtypeStruct leaves (keeps logical-axis metadata)

    def merge(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def shardings(self, mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> dict:
        """NamedShardings of the params dict from the logical-axis annotations, placed by ``rules``."""
        return nnx.to_pure_dict(parallel.state_shardings(self.template, mesh, rules))

    def hf_names(self) -> dict:
        """HF tensor names shaped like the params dict (for the reference's weight-decay groups)."""
        return hf_param_names(self.template, self.merge(self.abstract_params()).config)

    def abstract_params(self) -> dict:
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(self.template))


def split_model(model: nnx.Module) -> tuple[ModelDef, dict]:
    graphdef, state = nnx.split(model)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return ModelDef(graphdef, template), nnx.to_pure_dict(state)

