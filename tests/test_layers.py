"""Convs, separable convs, padding and resize against independent NumPy references."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_at_scale
from deeplab_jax.models import layers


def numpy_conv(x, w, stride, rate):
  """y[i] = sum_k xpad[i*stride + rate*k] w[k], padding by the SPEC's explicit rule. NHWC / HWIO."""
  kh, kw, cin, cout = w.shape
  (pt, pb), (pl, pr) = layers.explicit_padding(kh, rate), layers.explicit_padding(kw, rate)
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  eh, ew = (kh - 1) * rate + 1, (kw - 1) * rate + 1
  ho = (xp.shape[1] - eh) // stride + 1
  wo = (xp.shape[2] - ew) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, cout))
  for i, j in itertools.product(range(kh), range(kw)):
    patch = xp[:, i * rate:i * rate + (ho - 1) * stride + 1:stride,
               j * rate:j * rate + (wo - 1) * stride + 1:stride, :]
    y += np.einsum("nhwc,cd->nhwd", patch, w[i, j])
  return y


def dense_from_depthwise(w):
  """(k, k, 1, C) depthwise kernel -> the equivalent dense (k, k, C, C) kernel (zero off-diagonal)."""
  k1, k2, _, c = w.shape
  dense = np.zeros((k1, k2, c, c), w.dtype)
  for ch in range(c):
    dense[:, :, ch, ch] = w[:, :, 0, ch]
  return dense


@pytest.mark.parametrize("kernel,rate,expected", [(3, 1, (1, 1)), (3, 2, (2, 2)), (3, 6, (6, 6)),
                                                  (1, 1, (0, 0)), (7, 1, (3, 3)), (4, 1, (1, 2))])
def test_explicit_padding(kernel, rate, expected):
  assert layers.explicit_padding(kernel, rate) == expected


@pytest.mark.parametrize("size,stride,rate", [(9, 1, 1), (10, 1, 2), (11, 2, 1), (12, 2, 1),
                                              (13, 1, 3), (16, 1, 6), (8, 2, 1), (17, 1, 18)])
@pytest.mark.parametrize("impl", layers.DEPTHWISE_IMPLS)
def test_depthwise_equals_dense_and_numpy(size, stride, rate, impl):
  rng = np.random.default_rng(size * 100 + stride * 10 + rate)
  x = rng.normal(size=(2, size, size + 1, 5)).astype(np.float32)  # odd and even sides together
  w = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
  got = np.asarray(layers.depthwise_conv2d(jnp.asarray(x), jnp.asarray(w), stride, rate, impl=impl))
  dense = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(dense_from_depthwise(w)), stride, rate))
  ref = numpy_conv(x.astype(np.float64), dense_from_depthwise(w).astype(np.float64), stride, rate)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dense, ref, rtol=1e-4, atol=1e-4)


def test_layer_options_select_the_formulation_and_bn_momentum():
  model = layers.ConvBN(kernel_size=3, depthwise=True)
  x = jnp.ones((1, 5, 5, 2))
  variables = model.init(jax.random.key(0), x, train=False)
  with layers.layer_options(layers.LayerOptions(depthwise_impl="shift", bn_momentum=0.5)):
    _, updates = model.apply(variables, x * 3, train=True, mutable=["batch_stats"])
  mean = updates["batch_stats"]["bn"]["mean"]
  _, default = model.apply(variables, x * 3, train=True, mutable=["batch_stats"])
  # 0.5 decay moves halfway to the batch mean; the network's own 0.9997 barely moves.
  assert float(jnp.abs(mean).max()) > 100 * float(jnp.abs(default["batch_stats"]["bn"]["mean"]).max())
  with pytest.raises(ValueError, match="depthwise implementation 'fft'"):
    with layers.layer_options(layers.LayerOptions(depthwise_impl="fft")):
      pass


def test_one_by_one_conv_as_matmul_equals_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 10, 6)).astype(np.float32)
  w = rng.normal(size=(1, 1, 6, 4)).astype(np.float32)
  for stride in (1, 2):
    got = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(w), stride=stride))
    np.testing.assert_allclose(got, numpy_conv(x, w, stride, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,rate", [(9, 3, 1, 1), (10, 3, 2, 1), (11, 3, 2, 1),
                                                     (12, 3, 1, 2), (13, 7, 2, 1)])
def test_narrow_conv_as_patch_matmul_equals_xla_conv_with_gradients(size, kernel, stride, rate):
  rng = np.random.default_rng(size)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32))
  padding = (layers.explicit_padding(kernel, rate),) * 2

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, rhs_dilation=(rate, rate),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ours(x, w):
    return layers.conv2d(x, w, stride, rate)

  assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))  # the patch matmul on CPU
  cotangent = jnp.asarray(rng.normal(size=xla(x, w).shape).astype(np.float32))
  assert_close_at_scale(ours(x, w), xla(x, w), 1e-5, "output")
  for got, want in zip(jax.vjp(ours, x, w)[1](cotangent), jax.vjp(xla, x, w)[1](cotangent)):
    assert_close_at_scale(got, want, 1e-5, "gradient")


def test_wide_conv_stays_an_xla_conv():
  x, w = jnp.ones((1, 5, 5, 128)), jnp.ones((3, 3, 128, 8))  # 1152 > IM2COL_MAX_DEPTH
  assert 3 * 3 * 128 > layers.IM2COL_MAX_DEPTH
  assert "conv_general_dilated" in str(jax.make_jaxpr(layers.conv2d)(x, w))


def test_strided_conv_uses_explicit_padding_not_same_at_even_sizes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  got = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(w), stride=2))
  np.testing.assert_allclose(got, numpy_conv(x, w, 2, 1), rtol=1e-4, atol=1e-4)
  same = np.asarray(jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert got.shape == same.shape
  assert not np.allclose(got, same, atol=1e-3)  # SAME pads (0, 1) at even sizes; the rule pads (1, 1)


@pytest.mark.parametrize("activation_inside", [False, True])
@pytest.mark.parametrize("size,stride,rate", [(9, 1, 2), (10, 2, 1), (7, 1, 1)])
def test_separable_conv_module_equals_dense_reference(activation_inside, size, stride, rate):
  module = layers.SeparableConv(6, 3, stride=stride, rate=rate, activation_inside=activation_inside)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, size, size, 4)).astype(np.float32)
  variables = module.init(jax.random.key(0), jnp.asarray(x), train=False)
  # Non-trivial BN statistics so that the BN placement matters.
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), variables)
  got = np.asarray(module.apply(variables, jnp.asarray(x), train=False))

  p, s = variables["params"], variables["batch_stats"]

  def bn(y, name):
    return ((y - s[name]["bn"]["mean"]) / np.sqrt(s[name]["bn"]["var"] + module.bn.epsilon)
            * p[name]["bn"]["scale"] + p[name]["bn"]["bias"])

  relu = lambda y: np.maximum(y, 0)
  y = x if activation_inside else relu(x)
  y = bn(numpy_conv(y, dense_from_depthwise(np.asarray(p["depthwise"]["kernel"])), stride, rate),
         "depthwise")
  y = relu(y) if activation_inside else y
  y = bn(numpy_conv(y, np.asarray(p["pointwise"]["kernel"]), 1, 1), "pointwise")
  y = relu(y) if activation_inside else y
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)
  assert p["depthwise"]["kernel"].shape == (3, 3, 1, 4)
  assert "bias" not in p["depthwise"] and "bias" not in p["pointwise"]


def numpy_resize_align_corners(x, out_h, out_w):
  n, h, w, c = x.shape
  y = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      fy, fx = sy - y0, sx - x0
      y[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                    + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return y


@pytest.mark.parametrize("in_hw,out_hw", [((5, 5), (17, 17)), ((9, 7), (33, 25)), ((33, 33), (9, 9)),
                                          ((4, 6), (7, 7)), ((1, 1), (5, 3)), ((6, 6), (1, 1))])
def test_resize_bilinear_align_corners(in_hw, out_hw):
  x = np.random.default_rng(2).normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(got, numpy_resize_align_corners(x, *out_hw), rtol=1e-5, atol=1e-5)
  if min(out_hw) > 1:  # align_corners: the four corners are copied exactly
    for i, j in itertools.product((0, -1), (0, -1)):
      np.testing.assert_allclose(got[:, i, j], x[:, i, j], rtol=1e-6)


def test_resize_16k_plus_1_grid_is_exact():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 1, 5, 1))
  y = layers.resize_bilinear(x, (layers.scale_dimension(5, 4), 17))
  np.testing.assert_allclose(np.asarray(y)[0, :, 0, 0], np.arange(17) / 4, rtol=1e-6)
  assert layers.scale_dimension(513, 0.25) == 129 and layers.scale_dimension(769, 1 / 16) == 49


def test_atrous_schedule_follows_the_official_rule():
  # Xception-65 units after the stride-2 stem: entry 1-3 (stride 2), 16 middle, exit 1 (2), exit 2 (1).
  strides = [2, 2, 2] + [1] * 16 + [2, 1]
  os16 = layers.atrous_schedule(strides, 16, current_stride=2)
  assert os16[:3] == [(2, 1), (2, 1), (2, 1)]
  assert os16[-2:] == [(1, 1), (1, 2)]  # exit 1 loses its stride, exit 2 at rate 2
  os8 = layers.atrous_schedule(strides, 8, current_stride=2)
  assert os8[2] == (1, 1) and set(os8[3:19]) == {(1, 2)} and os8[-2:] == [(1, 2), (1, 4)]
  os32 = layers.atrous_schedule(strides, 32, current_stride=2)
  assert os32[-2:] == [(2, 1), (1, 1)]
  with pytest.raises(ValueError, match="cannot be reached"):
    layers.atrous_schedule(strides, 64, current_stride=2)
