"""The fast depthwise formulations against the reference grouped conv: outputs and both gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeplab_jax import native
from deeplab_jax.models import depthwise, layers

FAST = tuple(depthwise.IMPLS)  # shift, native
CASES = [(1, 1), (1, 2), (1, 6), (1, 12), (1, 18), (2, 1), (2, 2)]  # (stride, rate)


def output_and_grads(impl, x, kernel, stride, rate, cotangent_seed=1):
  """(y, dx, dk) of <y, g> for a fixed random cotangent g."""
  fn = lambda x, k: layers.depthwise_conv2d(x, k, stride, rate, impl=impl)  # noqa: E731
  y, vjp = jax.vjp(fn, x, kernel)
  g = jnp.asarray(np.random.default_rng(cotangent_seed).normal(size=y.shape), y.dtype)
  return (y,) + vjp(g)


def relative_error(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def inputs(stride, rate, dtype):
  rng = np.random.default_rng(100 * stride + rate)
  x = rng.normal(size=(2, 23, 26, 8))  # odd height, even width; rate 18 reaches past both sides
  kernel = rng.normal(size=(3, 3, 1, 8))
  return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


@pytest.mark.parametrize("stride,rate", CASES)
@pytest.mark.parametrize("impl", FAST)
def test_float32_output_and_gradients_equal_the_reference(impl, stride, rate):
  x, kernel = inputs(stride, rate, jnp.float32)
  reference = output_and_grads("grouped", x, kernel, stride, rate)
  for name, got, ref in zip(("y", "dx", "dk"), output_and_grads(impl, x, kernel, stride, rate),
                            reference):
    assert got.shape == ref.shape and got.dtype == ref.dtype, name
    assert relative_error(got, ref) < 1e-5, (name, relative_error(got, ref))


@pytest.mark.parametrize("stride,rate", [(2, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("impl", ("grouped",) + FAST)
def test_tf_same_padding_equals_xla_same_on_even_and_odd_sizes(impl, stride, rate):
  """strided_padding="same" (official TF MobileNetV2) against XLA's own "SAME" conv: at stride 2,
  0 before and 1 after on the even width (26), 1 and 1 on the odd height (23)."""
  x, kernel = inputs(stride, rate, jnp.float32)

  def same(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", rhs_dilation=(rate, rate),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])

  y, vjp = jax.vjp(same, x, kernel)
  g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), y.dtype)
  reference = (y,) + vjp(g)
  with layers.layer_options(layers.LayerOptions(strided_padding="same")):
    got = output_and_grads(impl, x, kernel, stride, rate)
  for name, a, b in zip(("y", "dx", "dk"), got, reference):
    assert a.shape == b.shape, name
    assert relative_error(a, b) < 1e-5, (name, relative_error(a, b))
  if stride == 2:  # and the fixed rule is another grid on the even side
    fixed = output_and_grads(impl, x, kernel, stride, rate)[0]
    assert relative_error(fixed, y) > 0.1


@pytest.mark.parametrize("stride,rate", [(1, 1), (1, 6), (2, 1)])
@pytest.mark.parametrize("impl", FAST)
def test_bfloat16_output_and_gradients_match_the_reference(impl, stride, rate):
  # bfloat16 keeps 8 bits of mantissa: results of the same inputs summed in another order differ by
  # a few units of 2**-8 (0.4%). Both the reference and the formulation, run in bfloat16, are held
  # to the float32 computation on the same bfloat16-rounded inputs.
  x, kernel = inputs(stride, rate, jnp.bfloat16)
  exact = output_and_grads("grouped", x.astype(jnp.float32), kernel.astype(jnp.float32), stride, rate)
  got = output_and_grads(impl, x, kernel, stride, rate)
  ref = output_and_grads("grouped", x, kernel, stride, rate)
  for name, g, r, e in zip(("y", "dx", "dk"), got, ref, exact):
    assert g.dtype == jnp.bfloat16, name
    assert relative_error(g, e) < 2e-2, (name, relative_error(g, e), relative_error(r, e))


def test_the_native_kernel_is_built_by_the_install():
  # .ci/run installs the package (pip install -e .), which compiles deeplab_jax/native/depthwise.cc.
  assert native.available(), native.unavailable_reason()


def test_native_depthwise_is_one_custom_call_each_way():
  x, kernel = inputs(1, 2, jnp.float32)
  hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise.native_depthwise(x, k, 1, 2) ** 2),
                         argnums=(0, 1))).lower(x, kernel).as_text()
  for kind in ("forward", "input_grad", "filter_grad"):
    assert hlo.count(native.target_name(kind)) == 1, kind
  assert "feature_group_count" not in hlo


def test_native_depthwise_repeats_bit_for_bit():
  # Its filter gradient sums fixed chunks in a fixed order, whatever thread ran which chunk.
  x, kernel = inputs(1, 1, jnp.float32)
  x = jnp.tile(x, (4, 4, 4, 1))  # large enough to be split over threads
  runs = [output_and_grads("native", x, kernel, 1, 1) for _ in range(3)]
  for other in runs[1:]:
    for a, b in zip(runs[0], other):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
