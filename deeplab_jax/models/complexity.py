"""Parameter and conv-MAC counts of a DeepLab model, per part, read off the traced computation.

MACs come from every conv op in the jaxpr at its true output size (native dilation), not from a
hand-kept table, so they follow the code.
"""
from __future__ import annotations

import math
from collections import defaultdict

import jax
import jax.extend
import jax.numpy as jnp

from deeplab_jax.models import create_model, layers

PARTS = ("backbone", "aspp", "decoder", "logits")


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _conv_macs(eqn) -> int:
  """Output elements x kernel elements per output (kh * kw * Cin / groups)."""
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  if eqn.primitive.name == "dot_general":  # a 1x1 conv (layers.conv2d): contracted size per output
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(out) * math.prod(lhs[d] for d in contracting)
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return math.prod(out) * math.prod(rhs) // out_features


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def conv_macs_by_part(jaxpr) -> dict[str, int]:
  """Sum conv (and 1x1-conv matmul) MACs per top-level module, read from each op's name stack (e.g. 'DeepLab/aspp/...')."""
  totals = defaultdict(int)

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        scopes = str(eqn.source_info.name_stack).split("/")
        if layers.RESIZE_SCOPE not in scopes:
          part = next((s for s in scopes if s in PARTS), "other")
          totals[part] += _conv_macs(eqn)
      for sub in _subjaxprs(eqn):
        walk(sub)

  walk(jaxpr)
  return dict(totals)


def model_stats(config, size: int, output_stride: int | None = None) -> dict:
  """{"params", "batch_stats", "gmacs", "parts": {part: {"params", "gmacs"}}} without computing."""
  # Counted on the reference formulation: other depthwise formulations hide convs in slices and adds.
  model = create_model(config, output_stride).clone(depthwise_impl="grouped")
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  macs = conv_macs_by_part(jaxpr.jaxpr)
  params = variables["params"]
  parts = {p: {"params": _count(params.get(p, {})), "gmacs": macs.get(p, 0) / 1e9}
           for p in PARTS if p in params or p in macs}
  return {"params": _count(params), "batch_stats": _count(variables.get("batch_stats", {})),
          "gmacs": sum(macs.values()) / 1e9, "parts": parts}


def format_table(stats: dict) -> str:
  rows = [f"{'part':<10} {'params':>14} {'GMACs':>10}"]
  for part, s in stats["parts"].items():
    rows.append(f"{part:<10} {s['params']:>14,} {s['gmacs']:>10.3f}")
  rows.append(f"{'total':<10} {stats['params']:>14,} {stats['gmacs']:>10.3f}")
  rows.append(f"{'BN stats':<10} {stats['batch_stats']:>14,}")
  return "\n".join(rows)


