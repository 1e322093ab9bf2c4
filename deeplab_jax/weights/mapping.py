"""The strict name-and-layout mapping every converter shares: our parameter tree walks the source.

A converter names, for each of our conv modules, its kernel and BatchNorm in the source file. Walking
*our* tree means a source tensor the network needs but the file lacks is found (missing), and every
source tensor not taken is listed (unused): a wrong architecture fails on its first bad tensor instead
of loading half a network.

BatchNorm moving variances: PyTorch and TF's fused BatchNorm both keep the Bessel-corrected batch
variance (n / (n - 1) times the biased one) in their running averages; flax, and ours, average the
biased one. Imported statistics are used as they are, so eval-mode outputs equal the source's exactly;
fine-tuning with trained BN then blends biased estimates into them, a relative difference of 1 / (n - 1)
with n = batch x height x width pixels per channel (below 1e-5 at 16 x 129 x 129), far inside the
moving average's own noise, so nothing is rescaled.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from deeplab_jax.errors import WeightsError

Path = tuple[str, ...]  # ("params", "backbone", ..., "kernel")


@dataclasses.dataclass(frozen=True)
class Format:
  """How one file format names a conv's tensors and lays out its kernels."""
  name: str
  bn_leaves: dict  # our BN leaf -> the source's suffix
  conv_layout: Callable[[np.ndarray], np.ndarray]  # the source's kernel -> (kh, kw, cin, cout)
  depthwise_layout: Callable[[np.ndarray], np.ndarray]  # -> (kh, kw, 1, C)
  # Source tensors that no network here holds and that are fine to leave behind (classifier heads,
  # optimizer slots, counters): `ignorable(name)` True.
  ignorable: Callable[[str], bool]


@dataclasses.dataclass(frozen=True)
class ConvNames:
  """One of our ConvBN modules in the source: the kernel's name and the BatchNorm's prefix."""
  kernel: str
  bn: Optional[str] = None
  bias: Optional[str] = None
  # The source's BatchNorm epsilon where it differs from ours (timm MobileNetV2: 1e-5 against the
  # official 1e-3): the moving variance is shifted by the difference so that var + eps, all eval
  # mode sees, is unchanged.
  bn_epsilon_shift: float = 0.0


def key_names(keypath) -> Path:
  """A jax key path as our names: ("params", "backbone", ..., "kernel")."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def flatten(tree) -> dict[Path, object]:
  return {key_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[Path, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def name(path: Path) -> str:
  return "/".join(path)


def _module_and_leaf(path: Path) -> tuple[Path, str]:
  """(the ConvBN module's path without the collection, its leaf: kernel, bias, bn/scale, ...)."""
  if path[-2] == "bn":
    return path[1:-2], "bn/" + path[-1]
  return path[1:-1], path[-1]


def convert(source: dict[str, np.ndarray], targets: dict[Path, object], fmt: Format,
            names: Callable[[Path], ConvNames], what: str) -> tuple[dict[Path, np.ndarray], dict]:
  """Every target leaf (shape-like values) from `source`: ({path: float32 array}, report).

  Raises WeightsError on the first target the source lacks or holds in another shape, and on a
  source tensor that nothing took unless the format may ignore it.
  """
  out, used = {}, set()
  for path in sorted(targets):
    module, leaf = _module_and_leaf(path)
    conv = names(module)
    depthwise = module[-1] == "depthwise"
    if leaf == "kernel":
      key, layout = conv.kernel, fmt.depthwise_layout if depthwise else fmt.conv_layout
    elif leaf == "bias":
      key, layout = conv.bias, None
    else:
      key, layout = (conv.bn or "") + fmt.bn_leaves[leaf], None
    if key is None or key not in source:
      raise WeightsError(f"{what} has no tensor {key} for {name(path)}: the file is not this "
                         f"architecture (or is incomplete); check --arch / the backbone")
    value = np.asarray(source[key])
    if layout is not None:
      if value.ndim != 4:
        raise WeightsError(f"{what}: {key} has shape {value.shape}, not a conv kernel, for "
                           f"{name(path)}; the file is not this architecture")
      value = layout(value)
    if leaf == "bn/var" and conv.bn_epsilon_shift:
      value = np.maximum(value + conv.bn_epsilon_shift, 0.0)
    want = tuple(targets[path].shape)
    if tuple(value.shape) != want:
      raise WeightsError(f"{what}: {key} has shape {tuple(value.shape)} after conversion but "
                         f"{name(path)} needs {want}; the file is another architecture or width "
                         f"(check --arch and the depth multiplier)")
    out[path] = np.ascontiguousarray(value, np.float32)
    used.add(key)
  leftover = sorted(set(source) - used)
  ignored = [k for k in leftover if fmt.ignorable(k)]
  unused = [k for k in leftover if not fmt.ignorable(k)]
  if unused:
    raise WeightsError(f"{what} has {len(unused)} tensors that no layer of this architecture takes, "
                       f"the first {unused[0]} {tuple(np.shape(source[unused[0]]))}: the file is "
                       f"another (larger) architecture; check --arch")
  report = {"tensors": len(out), "values": int(sum(v.size for v in out.values())),
            "trainable_values": int(sum(v.size for p, v in out.items() if p[0] == "params")),
            "ignored": ignored}
  return out, report


# Layouts: PyTorch convs are (cout, cin, kh, kw), depthwise (C, 1, kh, kw); TF's are (kh, kw, cin,
# cout) and depthwise (kh, kw, C, 1).
def torch_conv(w):
  return w.transpose(2, 3, 1, 0)


def tf_conv(w):
  return w


def tf_depthwise(w):
  return w.transpose(0, 1, 3, 2)
