"""Depthwise convolution formulations: one math, several programs (issue 6, ../PERF_NOTES.md).

Each takes NHWC `x` and a (kh, kw, 1, C) kernel, pads with the official fixed_padding rule and runs
VALID at `stride` with dilation `rate`, so all agree with the reference grouped conv
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


def _output_size(size: int, kernel_size: int, stride: int, rate: int) -> int:
  return (size + sum(explicit_padding(kernel_size, rate)) - (kernel_size - 1) * rate - 1) // stride + 1


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


def _pad(x: Array, kh: int, kw: int, rate: int) -> Array:
  return jnp.pad(x, ((0, 0), explicit_padding(kh, rate), explicit_padding(kw, rate), (0, 0)))


def _shift_forward(x: Array, kernel: Array, stride: int, rate: int) -> Array:
  kh, kw = kernel.shape[:2]
  out_hw = (_output_size(x.shape[1], kh, stride, rate), _output_size(x.shape[2], kw, stride, rate))
  return _correlate(_pad(x, kh, kw, rate), kernel[:, :, 0], stride, rate, out_hw)


def _input_grad_by_shift(g: Array, kernel: Array, in_hw: tuple[int, int], stride: int,
                         rate: int) -> Array:
  """dx: the stride-dilated gradient, padded so that dx[y] = sum_i g'[y + (kh-1-i)*rate] k[i]."""
  kh, kw = kernel.shape[:2]
  pads = []
  for size, k, out in ((in_hw[0], kh, g.shape[1]), (in_hw[1], kw, g.shape[2])):
    begin, end = explicit_padding(k, rate)
    dilated = (out - 1) * stride + 1
    pads.append((end, size + begin - dilated, stride - 1))  # low, high, interior
  g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), pads[0], pads[1], (0, 0, 0)))
  return _correlate(g, kernel[::-1, ::-1, 0], 1, rate, in_hw)


def _filter_grad_by_shift(x: Array, g: Array, kernel_shape, stride: int, rate: int) -> Array:
  kh, kw = kernel_shape[:2]
  x = _pad(x, kh, kw, rate)
  n, c = x.shape[0], x.shape[-1]
  rows = []
  for i in range(kh):
    for j in range(kw):
      limit = (n, i * rate + (g.shape[1] - 1) * stride + 1, j * rate + (g.shape[2] - 1) * stride + 1, c)
      tap = lax.slice(x, (0, i * rate, j * rate, 0), limit, (1, stride, stride, 1))
      rows.append(jnp.sum(tap.astype(jnp.float32) * g.astype(jnp.float32), axis=(0, 1, 2)))
  return jnp.stack(rows).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shift(x: Array, kernel: Array, stride: int = 1, rate: int = 1) -> Array:
  return _shift_forward(x, kernel, stride, rate)


def _shift_vjp_forward(x, kernel, stride, rate):
  return _shift_forward(x, kernel, stride, rate), (x, kernel)


def _shift_vjp_backward(stride, rate, residuals, g):
  x, kernel = residuals
  dx = _input_grad_by_shift(g, kernel, x.shape[1:3], stride, rate)
  dk = _filter_grad_by_shift(x, g, kernel.shape, stride, rate)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


shift.defvjp(_shift_vjp_forward, _shift_vjp_backward)


def _native_call(kind: str, a: Array, b: Array, out_shape, stride: int, rate: int, kh: int, kw: int):
  call = jax.ffi.ffi_call(native.target_name(kind), jax.ShapeDtypeStruct(out_shape, jnp.float32))
  return call(a, b, stride=np.int64(stride), rate=np.int64(rate),
              pad_top=np.int64(explicit_padding(kh, rate)[0]),
              pad_left=np.int64(explicit_padding(kw, rate)[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native(x: Array, kernel: Array, stride: int, rate: int) -> Array:
  kh, kw, _, c = kernel.shape
  out = (x.shape[0], _output_size(x.shape[1], kh, stride, rate),
         _output_size(x.shape[2], kw, stride, rate), c)
  return _native_call("forward", x, kernel.reshape(kh, kw, c), out, stride, rate, kh, kw)


def _native_forward(x, kernel, stride, rate):
  return _native(x, kernel, stride, rate), (x, kernel)


def _native_backward(stride, rate, residuals, g):
  x, kernel = residuals
  kh, kw, _, c = kernel.shape
  dx = _native_call("input_grad", g, kernel.reshape(kh, kw, c), x.shape, stride, rate, kh, kw)
  dk = _native_call("filter_grad", x, g, (kh, kw, c), stride, rate, kh, kw)
  return dx, dk.reshape(kernel.shape)


_native.defvjp(_native_forward, _native_backward)


def native_depthwise(x: Array, kernel: Array, stride: int = 1, rate: int = 1) -> Array:
  """The C++ kernel where it applies (float32, built, CPU); otherwise "shift".

  XLA's SPMD partitioner does not know the kernel, so over a multi-device mesh it runs replicated
  (correct, but gathers the batch): `resolve_depthwise_impl` picks it for one device only.
  """
  if (x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or jax.default_backend() != "cpu" or
      not native.available()):
    return shift(x, kernel, stride, rate)
  return _native(x, kernel, stride, rate)


IMPLS = {"shift": shift, "native": native_depthwise}
