"""Loss (ignore label, class weights, hard-pixel mining), metrics and the optimizer pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeplab_jax import losses, metrics, optim


def np_ce(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_loss_ignores_255_and_averages_over_valid_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 5))
  labels[0, :2] = 255
  valid = labels != 255
  expected = np_ce(logits, np.where(valid, labels, 0))[valid].mean()
  got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Changing the logits of ignored pixels changes nothing.
  logits2 = logits.copy()
  logits2[0, :2] += 100.0
  np.testing.assert_allclose(float(losses.segmentation_loss(jnp.asarray(logits2), jnp.asarray(labels))),
                             expected, rtol=1e-5)


def test_loss_upsamples_logits_to_the_label_size():
  logits = jnp.zeros((1, 3, 3, 2)).at[..., 1].set(1.0)
  labels = jnp.ones((1, 9, 9, 1), jnp.int32)
  got = float(losses.segmentation_loss(logits, labels))
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-5)


def test_class_weights_weight_pixels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(1, 4, 4))
  w = np.array([0.5, 2.0, 0.0], np.float32)
  ce = np_ce(logits, labels)
  expected = (ce * w[labels]).sum() / (w[labels] > 0).sum()  # official: mean over non-zero weights
  got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), class_weights=w)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_top_k_keeps_the_hardest_pixels_with_its_ramp():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 8, 8))
  ce = np.sort(np_ce(logits, labels).reshape(-1))[::-1]
  n = ce.size
  kwargs = dict(top_k_percent=25.0, hard_mining_steps=100)
  at = lambda step: float(losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                   step=step, **kwargs))
  np.testing.assert_allclose(at(0), ce.mean(), rtol=1e-5)  # ramp starts at 100%
  np.testing.assert_allclose(at(100), ce[:n // 4].mean(), rtol=1e-5)
  np.testing.assert_allclose(at(1000), ce[:n // 4].mean(), rtol=1e-5)
  k_half = int((0.5 * 0.25 + 0.5) * n)
  np.testing.assert_allclose(at(50), ce[:k_half].mean(), rtol=1e-5)
  # The step can be traced (the ramp runs inside a jitted train step).
  jitted = jax.jit(lambda s: losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                      step=s, **kwargs))
  np.testing.assert_allclose(float(jitted(jnp.int32(50))), ce[:k_half].mean(), rtol=1e-5)


def test_mean_iou_on_a_hand_computed_confusion_matrix():
  labels = jnp.array([[0, 0, 1, 1, 2, 255]])
  preds = jnp.array([[0, 1, 1, 1, 0, 2]])
  cm = np.asarray(metrics.confusion_matrix(labels, preds, 3))
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
  m = metrics.metrics_from_confusion(cm)
  # IoU0 = 1 / (2 + 2 - 1), IoU1 = 2 / (2 + 3 - 2), IoU2 = 0 / (1 + 0 - 0)
  np.testing.assert_allclose(m["per_class_iou"], [1 / 3, 2 / 3, 0.0])
  np.testing.assert_allclose(m["mean_iou"], (1 / 3 + 2 / 3 + 0) / 3)
  np.testing.assert_allclose(m["pixel_accuracy"], 3 / 5)


def test_absent_classes_are_left_out_of_the_mean():
  m = metrics.metrics_from_confusion(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
  assert np.isnan(m["per_class_iou"][2])
  np.testing.assert_allclose(m["mean_iou"], (3 / 4 + 4 / 5) / 2)


def test_padded_examples_are_masked_out():
  labels = jnp.array([[[1, 1]], [[0, 1]]])
  preds = jnp.array([[[1, 0]], [[1, 1]]])
  cm = metrics.confusion_matrix(labels, preds, 2, mask=jnp.array([True, False]))
  np.testing.assert_array_equal(np.asarray(cm), [[0, 0], [1, 1]])


@pytest.mark.parametrize("warmup", [0, 10])
def test_poly_schedule_values(warmup):
  schedule = optim.poly_schedule(0.007, 100, warmup_steps=warmup)
  if warmup == 0:
    for step in (0, 1, 50, 99, 100, 150):
      expected = 0.007 * max(0.0, 1 - step / 100) ** 0.9
      np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9)
  else:
    np.testing.assert_allclose(float(schedule(0)), 0.0, atol=1e-9)
    np.testing.assert_allclose(float(schedule(5)), 0.0035, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(10)), 0.007, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(55)), 0.007 * 0.5 ** 0.9, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-9)
  with pytest.raises(ValueError):
    optim.poly_schedule(0.1, 10, warmup_steps=10)


def test_weight_decay_mask_covers_conv_kernels_only():
  from deeplab_jax.models import heads
  params = heads.ASPP((2,), separable=True, channels=8).init(
      jax.random.key(0), jnp.zeros((1, 5, 5, 4)), False, False)["params"]
  logits = heads.Logits(3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 8)))["params"]
  mask = optim.weight_decay_mask({"aspp": params, "logits": logits})
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['aspp']['aspp0']['kernel']"] is True
  assert flat["['aspp']['aspp1']['pointwise']['kernel']"] is True
  assert flat["['aspp']['aspp1']['depthwise']['kernel']"] is False
  assert flat["['aspp']['aspp0']['bn']['scale']"] is False
  assert flat["['aspp']['aspp0']['bn']['bias']"] is False
  assert flat["['logits']['semantic']['kernel']"] is True
  assert flat["['logits']['semantic']['bias']"] is False


def test_optimizer_applies_l2_decay_before_momentum():
  params = {"conv": {"kernel": jnp.ones((1, 1, 1, 2))}, "bn": {"scale": jnp.ones((2,))}}
  tx = optim.create_optimizer(0.1, momentum=0.9, weight_decay=0.5)
  state = tx.init(params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, state = tx.update(zero, state, params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * np.ones((1, 1, 1, 2)))
  np.testing.assert_allclose(updates["bn"]["scale"], 0.0)
  updates, _ = tx.update(zero, state, params)  # momentum: 0.5 + 0.9 * 0.5
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.95 * np.ones((1, 1, 1, 2)))
  assert isinstance(optim.create_optimizer(0.1, grad_clip_norm=1.0), optax.GradientTransformation)


def test_adam_is_adamw_with_decay_on_conv_kernels_only():
  params = {"conv": {"kernel": jnp.full((1, 1, 1, 2), 2.0)}, "bn": {"scale": jnp.ones((2,))}}
  grads = {"conv": {"kernel": jnp.array([[[[0.3, -1.0]]]])}, "bn": {"scale": jnp.array([0.5, 0.0])}}
  ours = optim.create_optimizer(0.01, name="adam", momentum=0.9, weight_decay=0.1)
  reference = optax.adamw(0.01, b1=0.9, weight_decay=0.1, mask=optim.weight_decay_mask)
  s1, s2 = ours.init(params), reference.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = reference.update(grads, s2, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.create_optimizer(0.1, name="lamb")
