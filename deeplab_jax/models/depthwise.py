"""Depthwise convolution formulations: one math, several programs (issue 6, ../PERF_NOTES.md).

Each takes NHWC `x` and a (kh, kw, 1, C) kernel, pads with the official fixed_padding rule (or the
given `padding`, ((top, bottom), (left, right)): TF SAME at stride 2) and runs VALID at `stride` with
dilation `rate`, so all agree with the reference grouped conv
(`layers.conv2d(..., groups=C)`) up to float32 rounding (tests/test_depthwise.py).

- "shift": the sum over taps of strided slices times the tap's weights, with a backward that is also
  shift-and-accumulate: the input gradient is the same correlation with the flipped kernel over the
  stride-dilated gradient, the filter gradient a per-tap reduction summed in float32. (Autodiff of
  the forward was slower, PERF_NOTES.md, and summed bfloat16 filter gradients in bfloat16: 3-7%
  off over 1,200 pixels, where the reference was 0.3%.)
- "native": a C++ kernel through XLA FFI (deeplab_jax/native), float32 on CPU; other dtypes use
  "shift".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from deeplab_jax import native

Array = jax.Array


def explicit_padding(kernel_size: int, rate: int = 1) -> tuple[int, int]:
  """The official `fixed_padding` rule: pad for the dilated kernel, extra pixel at the end.

  At stride 1 this is exactly TF's SAME, so it is used for every conv: one rule, no even/odd surprises.
  """
  effective = kernel_size + (kernel_size - 1) * (rate - 1)
  total = effective - 1
  begin = total // 2
  return begin, total - begin


Padding = tuple[tuple[int, int], tuple[int, int]]


def same_padding(size: int, kernel_size: int, stride: int, rate: int = 1) -> tuple[int, int]:
  """TF's SAME: ceil(size / stride) outputs, the padding split with the odd pixel at the end. At
  stride 1 it equals `explicit_padding`; at stride 2 on an even size it is (0, 1) where that is (1, 1)."""
  effective = (kernel_size - 1) * rate + 1
  total = max((-(-size // stride) - 1) * stride + effective - size, 0)
  return total // 2, total - total // 2


def resolve_padding(padding: Padding | None, kh: int, kw: int, rate: int) -> Padding:
  return padding if padding is not None else (explicit_padding(kh, rate), explicit_padding(kw, rate))


def _output_size(size: int, kernel_size: int, stride: int, rate: int, pad: tuple[int, int]) -> int:
  return (size + sum(pad) - (kernel_size - 1) * rate - 1) // stride + 1


def _correlate(x: Array, taps: Array, stride: int, rate: int, out_hw: tuple[int, int]) -> Array:
  """sum_ij x[:, p*stride + i*rate, q*stride + j*rate] * taps[i, j] over an already padded x."""
  n, c = x.shape[0], x.shape[-1]
  out = None
  for i in range(taps.shape[0]):
    for j in range(taps.shape[1]):
      start = (0, i * rate, j * rate, 0)
      limit = (n, i * rate + (out_hw[0] - 1) * stride + 1, j * rate + (out_hw[1] - 1) * stride + 1, c)
      tap = lax.slice(x, start, limit, (1, stride, stride, 1)) * taps[i, j]
      out = tap if out is None else out + tap
  return out


def _pad(x: Array, padding: Padding) -> Array:
  return jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


def _out_hw(x_shape, kernel_shape, stride: int, rate: int, padding: Padding) -> tuple[int, int]:
  return tuple(_output_size(x_shape[1 + a], kernel_shape[a], stride, rate, padding[a]) for a in (0, 1))


def _shift_forward(x: Array, kernel: Array, stride: int, rate: int, padding: Padding) -> Array:
  out_hw = _out_hw(x.shape, kernel.shape, stride, rate, padding)
  return _correlate(_pad(x, padding), kernel[:, :, 0], stride, rate, out_hw)


def _input_grad_by_shift(g: Array, kernel: Array, in_hw: tuple[int, int], stride: int,
                         rate: int, padding: Padding) -> Array:
  """dx: the stride-dilated gradient, padded so that dx[y] = sum_i g'[y + (kh-1-i)*rate] k[i]."""
  kh, kw = kernel.shape[:2]
  pads = []
  for size, k, out, (begin, _) in ((in_hw[0], kh, g.shape[1], padding[0]),
                                   (in_hw[1], kw, g.shape[2], padding[1])):
    dilated = (out - 1) * stride + 1
    pads.append(((k - 1) * rate - begin, size + begin - dilated, stride - 1))  # low, high, interior
  g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), pads[0], pads[1], (0, 0, 0)))
  return _correlate(g, kernel[::-1, ::-1, 0], 1, rate, in_hw)


def _filter_grad_by_shift(x: Array, g: Array, kernel_shape, stride: int, rate: int,
                          padding: Padding) -> Array:
  kh, kw = kernel_shape[:2]
  x = _pad(x, padding)
  n, c = x.shape[0], x.shape[-1]
  rows = []
  for i in range(kh):
    for j in range(kw):
      limit = (n, i * rate + (g.shape[1] - 1) * stride + 1, j * rate + (g.shape[2] - 1) * stride + 1, c)
      tap = lax.slice(x, (0, i * rate, j * rate, 0), limit, (1, stride, stride, 1))
      rows.append(jnp.sum(tap.astype(jnp.float32) * g.astype(jnp.float32), axis=(0, 1, 2)))
  return jnp.stack(rows).reshape(kh, kw, 1, c)


def shift(x: Array, kernel: Array, stride: int = 1, rate: int = 1,
          padding: Padding | None = None) -> Array:
  return _shift(x, kernel, stride, rate, resolve_padding(padding, *kernel.shape[:2], rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift(x: Array, kernel: Array, stride: int, rate: int, padding: Padding) -> Array:
  return _shift_forward(x, kernel, stride, rate, padding)


def _shift_vjp_forward(x, kernel, stride, rate, padding):
  return _shift_forward(x, kernel, stride, rate, padding), (x, kernel)


def _shift_vjp_backward(stride, rate, padding, residuals, g):
  x, kernel = residuals
  dx = _input_grad_by_shift(g, kernel, x.shape[1:3], stride, rate, padding)
  dk = _filter_grad_by_shift(x, g, kernel.shape, stride, rate, padding)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_shift.defvjp(_shift_vjp_forward, _shift_vjp_backward)


def _native_call(kind: str, a: Array, b: Array, out_shape, stride: int, rate: int, padding: Padding):
  call = jax.ffi.ffi_call(native.target_name(kind), jax.ShapeDtypeStruct(out_shape, jnp.float32))
  return call(a, b, stride=np.int64(stride), rate=np.int64(rate), pad_top=np.int64(padding[0][0]),
              pad_left=np.int64(padding[1][0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native(x: Array, kernel: Array, stride: int, rate: int, padding: Padding) -> Array:
  kh, kw, _, c = kernel.shape
  out = (x.shape[0], *_out_hw(x.shape, kernel.shape, stride, rate, padding), c)
  return _native_call("forward", x, kernel.reshape(kh, kw, c), out, stride, rate, padding)


def _native_forward(x, kernel, stride, rate, padding):
  return _native(x, kernel, stride, rate, padding), (x, kernel)


def _native_backward(stride, rate, padding, residuals, g):
  x, kernel = residuals
  kh, kw, _, c = kernel.shape
  dx = _native_call("input_grad", g, kernel.reshape(kh, kw, c), x.shape, stride, rate, padding)
  dk = _native_call("filter_grad", x, g, (kh, kw, c), stride, rate, padding)
  return dx, dk.reshape(kernel.shape)


_native.defvjp(_native_forward, _native_backward)


def native_depthwise(x: Array, kernel: Array, stride: int = 1, rate: int = 1,
                     padding: Padding | None = None) -> Array:
  """The C++ kernel where it applies (float32, built, CPU); otherwise "shift".

  XLA's SPMD partitioner does not know the kernel, so over a multi-device mesh it runs replicated
  (correct, but gathers the batch): `resolve_depthwise_impl` picks it for one device only.
  """
  if (x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or jax.default_backend() != "cpu" or
      not native.available()):
    return shift(x, kernel, stride, rate, padding)
  return _native(x, kernel, stride, rate, resolve_padding(padding, *kernel.shape[:2], rate))


IMPLS = {"shift": shift, "native": native_depthwise}
