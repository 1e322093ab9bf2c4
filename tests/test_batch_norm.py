"""models/batch_norm.BatchNorm against flax.linen.BatchNorm: variables, outputs, gradients, statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_at_scale, assert_trees_close_at_scale
from deeplab_jax.models.batch_norm import BatchNorm


def both(train: bool, dtype=jnp.float32):
  ours = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype,
                     param_dtype=jnp.float32)
  return ours, ref


def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, (4, 7, 6, 5)), jnp.float32)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=5), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=5), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32)}}
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  return x, variables, cotangent


def test_same_variables_as_flax():
  x, _, _ = data()
  ours, ref = both(train=False)
  a, b = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
  assert jax.tree.map(lambda v: (v.shape, v.dtype), a) == jax.tree.map(lambda v: (v.shape, v.dtype), b)
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(leaf_a, leaf_b)


@pytest.mark.parametrize("train", [True, False])
def test_outputs_gradients_and_running_statistics_equal_flax(train):
  x, variables, cotangent = data()
  results = []
  for module in both(train):
    def loss(params, x):
      y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                mutable=["batch_stats"])
      return jnp.sum(y * cotangent), (y, updates)
    (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    results.append((y, grads, updates))
  (y, grads, updates), (y_ref, grads_ref, updates_ref) = results
  # A closed-form backward against autodiff: the same math summed in another order.
  assert_close_at_scale(y, y_ref, 1e-5, "output")
  assert_trees_close_at_scale(grads, grads_ref, 1e-5)
  assert_trees_close_at_scale(updates, updates_ref, 1e-6)


def test_bfloat16_output_dtype_and_float32_statistics():
  x, variables, _ = data()
  ours, _ = both(train=True, dtype=jnp.bfloat16)
  y, updates = ours.apply(variables, x.astype(jnp.bfloat16), mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and updates["batch_stats"]["mean"].dtype == jnp.float32
