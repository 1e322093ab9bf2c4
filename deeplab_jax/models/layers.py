"""Building blocks shared by every backbone and head (SPEC section 1).

Convolutions are plain functions over explicit kernels so that a faster depthwise formulation can be
swapped in later without touching parameter names; the modules only own parameters and BatchNorm.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from deeplab_jax.models import depthwise as depthwise_lib
from deeplab_jax.models.batch_norm import BatchNorm
from deeplab_jax.models.depthwise import explicit_padding  # noqa: F401  (re-exported)

Array = jax.Array
Dtype = Any
Activation = Optional[Callable[[Array], Array]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
  """Per-network BatchNorm settings; flax `momentum` is TF's `decay`."""
  momentum: float
  epsilon: float


# Widest (taps x input channels) patch matrix that `conv2d` builds on CPUs and TPUs instead of a
# convolution. Measured on XLA:CPU (2-core Zen 3), forward + both gradients: 257x257x3 -> 32 stride 2,
# 5.9 -> 3.3 ms; 129x129x32 -> 64, 58 -> 27 ms; 65x65x64 -> 64, 24 -> 18 ms; but 33x33x128 -> 128
# (1152 wide), 13.3 -> 14.5 ms, and wider patch matrices cost 9x the input's memory for no gain. On a
# TPU (the v5e compiler's prediction, Xception-65 513x513 train step, bfloat16) the stems as patch
# matmuls cut the bytes counted per image 12% and the compiler's cycles 11% (benchmarks/README.md):
# 3 or 32 channels fill a quarter or less of the TPU's 128-lane tiles, 27 or 288 taps x channels more.
IM2COL_MAX_DEPTH = 576
PATCH_MATMUL_PLATFORMS = ("cpu", "tpu")


def conv2d(x: Array, kernel: Array, stride: int = 1, rate: int = 1, groups: int = 1) -> Array:
  """Atrous conv: explicit padding then VALID, dilation as `rhs_dilation`.

  A 1x1 conv is a strided slice and a matmul: the same math, but XLA:CPU computed the weight gradient
  of the conv form about 10x slower than that of the matmul form (decoder 1x1s, measured here).
  On CPUs and TPUs narrow kxk convs (the stems) are one matmul over their patches (IM2COL_MAX_DEPTH).
  """
  kh, kw, cin, _ = kernel.shape
  rates = (rate, rate) if kh > 1 or kw > 1 else (1, 1)
  padding = _padding(x, kh, kw, stride, rates[0])
  narrow = kh * kw * cin <= IM2COL_MAX_DEPTH and target_platform() in PATCH_MATMUL_PLATFORMS
  if groups == 1 and (kh == kw == 1 or narrow):
    return _patch_matmul(x, kernel, stride, rates, padding)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding, rhs_dilation=rates,
      dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=groups)


def _patch_matmul(x: Array, kernel: Array, stride: int, rates, padding) -> Array:
  """The conv as (pixels, taps * cin) @ (taps * cin, cout), taps in the kernel's (kh, kw) order; a
  1x1 conv is one tap: a strided slice and a matmul."""
  kh, kw, cin, cout = kernel.shape
  if padding != ((0, 0), (0, 0)):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, h, w, _ = x.shape
  oh = (h - (kh - 1) * rates[0] - 1) // stride + 1
  ow = (w - (kw - 1) * rates[1] - 1) // stride + 1
  span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
  taps = [lax.slice(x, (0, i * rates[0], j * rates[1], 0),
                    (n, i * rates[0] + span_h, j * rates[1] + span_w, cin), (1, stride, stride, 1))
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(taps, axis=-1).reshape(n * oh * ow, kh * kw * cin)
  y = lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((1,), (0,)), ((), ())))
  return y.reshape(n, oh, ow, cout)


def _padding(x: Array, kh: int, kw: int, stride: int, rate: int) -> depthwise_lib.Padding:
  """The official fixed_padding, or TF SAME on strided convs (LayerOptions.strided_padding)."""
  if stride > 1 and _options.get().strided_padding == "same":
    return (depthwise_lib.same_padding(x.shape[1], kh, stride, rate),
            depthwise_lib.same_padding(x.shape[2], kw, stride, rate))
  return explicit_padding(kh, rate), explicit_padding(kw, rate)


DEPTHWISE_IMPLS = ("grouped",) + tuple(depthwise_lib.IMPLS)
STRIDED_PADDINGS = ("fixed", "same")


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """Whole-model choices that change computation but not parameters; DeepLab sets them per model.

  depthwise_impl: see `depthwise_conv2d`. bn_momentum: overrides every network's own BatchNorm decay
  (short runs from scratch need a faster one than the paper's 0.9997). remat: see `backbone_unit`.
  platform: the backend the program is for (None: this process's), which may differ from the one
  tracing it when compiling ahead of time for a TPU on a CPU (deeplab_jax.aot). strided_padding:
  "fixed" pads every conv by the official fixed_padding rule (Xception, ResNet; PyTorch's symmetric
  padding); "same" pads strided convs as TF SAME does (0 before and 1 after a 3x3 stride-2 conv on
  an even size), as the official slim MobileNetV2 was trained.
  """
  depthwise_impl: str = "grouped"
  bn_momentum: Optional[float] = None
  remat: bool = False
  platform: Optional[str] = None
  strided_padding: str = "fixed"


_options: contextvars.ContextVar[LayerOptions] = contextvars.ContextVar("layer_options",
                                                                       default=LayerOptions())


@contextlib.contextmanager
def layer_options(options: LayerOptions):
  """Apply `options` to the modules traced inside the block.

  A context rather than a field on every module: parameter trees stay identical across choices.
  """
  if options.depthwise_impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise implementation {options.depthwise_impl!r}: choose one of "
                     f"{', '.join(DEPTHWISE_IMPLS)}")
  if options.strided_padding not in STRIDED_PADDINGS:
    raise ValueError(f"strided padding {options.strided_padding!r}: choose one of "
                     f"{', '.join(STRIDED_PADDINGS)}")
  token = _options.set(options)
  try:
    yield
  finally:
    _options.reset(token)


def target_platform() -> str:
  """The backend the traced program is for: LayerOptions.platform, else this process's default."""
  return _options.get().platform or jax.default_backend()


@functools.lru_cache(maxsize=None)
def _rematerialized(unit: type) -> type:
  return nn.remat(unit, static_argnums=(2,))  # (self, x, train): `train` is a Python bool


def backbone_unit(unit: type) -> type:
  """`unit` (a backbone's repeated block, called as unit(...)(x, train)), rematerialized under
  LayerOptions(remat=True): the backward pass recomputes its activations instead of keeping them,
  for crops that do not fit otherwise. Parameter names are unchanged."""
  return _rematerialized(unit) if _options.get().remat else unit


def depthwise_conv2d(x: Array, kernel: Array, stride: int = 1, rate: int = 1,
                     impl: Optional[str] = None) -> Array:
  """Depthwise conv with one (kh, kw, 1, C) filter per channel.

  "grouped" is the reference: `feature_group_count=C`. The others (models/depthwise.py) compute the
  same math as other programs: several times faster on XLA:CPU (PERF_NOTES.md).
  """
  if kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"depthwise kernel {kernel.shape} does not fit input channels {x.shape[-1]}")
  impl = impl or _options.get().depthwise_impl
  if impl == "grouped":
    return conv2d(x, kernel, stride, rate, groups=x.shape[-1])
  if impl not in depthwise_lib.IMPLS:
    raise ValueError(f"depthwise implementation {impl!r}: choose one of {', '.join(DEPTHWISE_IMPLS)}")
  if impl == "native" and target_platform() != "cpu":  # the kernel is a CPU library
    impl = "shift"
  padding = _padding(x, *kernel.shape[:2], stride, rate)
  return depthwise_lib.IMPLS[impl](x, kernel, stride, rate, padding)


RESIZE_SCOPE = "align_corners_resize"


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) align_corners=True bilinear weights: row o holds 1 - frac at floor(src), frac at the
  next pixel, where src = o * (in - 1) / (out - 1) (corners map to corners)."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  np.add.at(matrix, (np.arange(out_size), lo), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), hi), frac)
  return matrix


def _resize_axis(x: Array, axis: int, out_size: int) -> Array:
  """As a small matmul rather than two gathers: XLA:CPU ran the gathers, and their scatter-add
  transposes in the backward, far slower than the (out x in) weights times the axis."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  matrix = jnp.asarray(interpolation_matrix(in_size, out_size), x.dtype)
  with jax.named_scope(RESIZE_SCOPE):  # complexity.py counts convs, not these
    y = lax.dot_general(matrix, x, (((1,), (axis,)), ((), ())), precision=lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
  """Bilinear resize of NHWC `x` to `size` with TF's align_corners=True (jax.image.resize lacks it)."""
  x = _resize_axis(x, 1, int(size[0]))
  return _resize_axis(x, 2, int(size[1]))


def scale_dimension(dim: int, scale: float) -> int:
  """The official target-size rule, exact for 16k+1 sizes."""
  return int((dim - 1) * scale + 1)


def relu6(x: Array) -> Array:
  return jnp.clip(x, 0, 6)


class ConvBN(nn.Module):
  """Conv (regular or depthwise) + optional BatchNorm + optional activation.

  Parameter names mirror TF-slim's (`kernel` ~ weights, `bn/scale` ~ BatchNorm/gamma) for weight import.
  No bias before a BatchNorm: the only bias in DeepLab is the logits layer's.
  """
  features: Optional[int] = None  # None for depthwise: as many outputs as inputs.
  kernel_size: int = 1
  stride: int = 1
  rate: int = 1
  depthwise: bool = False
  use_bn: bool = True
  use_bias: bool = False
  activation: Activation = None
  bn: BatchNormConfig = BatchNormConfig(0.9997, 1e-5)
  kernel_init: Callable = nn.initializers.truncated_normal(0.09)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    k, cin = self.kernel_size, x.shape[-1]
    if self.depthwise:
      shape = (k, k, 1, cin)
    else:
      if self.features is None:
        raise ValueError(f"{self.name}: a regular conv needs `features`")
      shape = (k, k, cin, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if self.depthwise:
      y = depthwise_conv2d(x, kernel, self.stride, self.rate)
    else:
      y = conv2d(x, kernel, self.stride, self.rate)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (shape[-1],), jnp.float32).astype(self.dtype)
    if self.use_bn:
      momentum = _options.get().bn_momentum or self.bn.momentum
      y = BatchNorm(use_running_average=not train, momentum=momentum, epsilon=self.bn.epsilon,
                    dtype=self.dtype, name="bn")(y)
    if self.activation is not None:
      y = self.activation(y)
    return y


class Backbone(nn.Module):
  """What every backbone takes; each returns (features at the output stride, low-level at stride 4)."""
  output_stride: int = 16
  multi_grid: Sequence[int] = (1, 1, 1)  # Rate multipliers of the last block's three units/convs.
  depth_multiplier: float = 1.0
  dtype: Dtype = jnp.float32


class SeparableConv(nn.Module):
  """Atrous depthwise separable conv, in either of SPEC section 2's activation orders.

  activation_inside=False (Xception entry/middle/exit-1): ReLU(x), depthwise, BN, pointwise, BN.
  activation_inside=True (Xception exit-2, ASPP, decoder): depthwise, BN, ReLU, pointwise, BN, ReLU.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  rate: int = 1
  activation_inside: bool = False
  bn: BatchNormConfig = BatchNormConfig(0.9997, 1e-5)
  depthwise_init: Callable = nn.initializers.truncated_normal(0.09)
  pointwise_init: Callable = nn.initializers.truncated_normal(0.09)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    activation = nn.relu if self.activation_inside else None
    if not self.activation_inside:
      x = nn.relu(x)
    x = ConvBN(kernel_size=self.kernel_size, stride=self.stride, rate=self.rate, depthwise=True,
               activation=activation, bn=self.bn, kernel_init=self.depthwise_init, dtype=self.dtype,
               name="depthwise")(x, train)
    return ConvBN(self.features, 1, activation=activation, bn=self.bn,
                  kernel_init=self.pointwise_init, dtype=self.dtype, name="pointwise")(x, train)


def atrous_schedule(strides: Sequence[int], output_stride: Optional[int],
                    current_stride: int = 1) -> list[tuple[int, int]]:
  """(stride, rate) per unit: the official `stack_blocks_dense` rule.

  Once the running stride reaches `output_stride`, later units run at stride 1 and the atrous rate
  grows by the stride they would have had. Only strides and rates change, never parameters.
  """
  rate, plan = 1, []
  for stride in strides:
    if output_stride is not None and current_stride == output_stride:
      plan.append((1, rate))
      rate *= stride
    else:
      plan.append((stride, 1))
      current_stride *= stride
  if output_stride is not None and current_stride != output_stride:
    raise ValueError(f"output_stride={output_stride} cannot be reached: the network's total stride "
                     f"is {current_stride}")
  return plan
