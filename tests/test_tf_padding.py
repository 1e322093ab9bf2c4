"""Official TF MobileNetV2 weights (slim's ImageNet and the DeepLab model zoo) were trained with TF SAME
padding, which pads a 3x3 stride-2 conv on an even size 0 before and 1 after, not fixed_padding's 1
and 1 (issue 30, item 0). Our backbone under config.model.strided_padding="same" must compute what
plain TensorFlow computes from the same official checkpoint; "fixed" must not, on even sizes only."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import fake_weights as fw
from deeplab_jax.models import create_model
from deeplab_jax.weights import convert, mapping

EVEN, ODD = (128, 160), (129, 161)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A MobileNetV2 (0.5) DeepLabv3+ checkpoint by the official names: (values, our variables, info),
  with values whose features depend on the input (fw.signal_values)."""
  backbone, low_level, features = fw.mobilenet_v2(0.5)
  values = fw.signal_values({**backbone, **fw.deeplab_head(features, low_level, num_classes=21)}, seed=1)
  prefix = tmp_path_factory.mktemp("tf_mobilenet") / "model.ckpt"
  fw.write_tf_checkpoint(prefix, values)
  tree, info = convert.convert("tf_deeplab", None, prefix)
  return values, mapping.unflatten(tree), info


def tf_mobilenet_v2(values, x, output_stride):
  """slim's mobilenet_v2 up to layer_18 in plain TF ops: SAME padding everywhere, inference BN
  (epsilon 1e-3), ReLU6; past `output_stride`, stride 1 and the rate grows (official mobilenet.py).
  Returns (features, layer_4/depthwise_output)."""
  import tensorflow as tf

  def bn(y, scope, activation=True):
    y = tf.nn.batch_normalization(y, values[f"{scope}/BatchNorm/moving_mean"],
                                  values[f"{scope}/BatchNorm/moving_variance"],
                                  values[f"{scope}/BatchNorm/beta"], values[f"{scope}/BatchNorm/gamma"], 1e-3)
    return tf.nn.relu6(y) if activation else y

  def conv(y, scope, stride=1, activation=True):
    return bn(tf.nn.conv2d(y, values[f"{scope}/weights"], stride, "SAME"), scope, activation)

  y = conv(tf.constant(x), "MobilenetV2/Conv", stride=2)
  current, rate, i, low_level = 2, 1, 0, None
  for t, _, n, s in fw.MOBILENET_V2:
    for repeat in range(n):
      stride = s if repeat == 0 else 1
      if current == output_stride:
        stride, layer_rate, rate = 1, rate, rate * stride
      else:
        layer_rate, current = 1, current * stride
      p = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
      h = conv(y, f"{p}/expand") if t != 1 else y
      h = tf.nn.depthwise_conv2d(h, values[f"{p}/depthwise/depthwise_weights"], [1, stride, stride, 1],
                                 "SAME", dilations=[layer_rate, layer_rate])
      h = bn(h, f"{p}/depthwise")
      if i == 2:
        low_level = h
      out = conv(h, f"{p}/project", activation=False)
      y = out + y if stride == 1 and out.shape[-1] == y.shape[-1] else out
      i += 1
  assert current == output_stride
  return y.numpy(), low_level.numpy()


def ours(variables, info, images, strided_padding, output_stride):
  """(features, low_level) of the backbone inside create_model(config)'s DeepLab, depthwise "auto"."""
  config = convert.model_config(info["backbone"], info["depth_multiplier"], info["head"])
  config.model.strided_padding = strided_padding
  config.model.output_stride = output_stride
  model = create_model(config)
  capture = lambda module, method: module.name == "backbone" and method == "__call__"
  state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=capture)[1])(variables, images)
  return tuple(np.asarray(a) for a in state["intermediates"]["backbone"]["__call__"][0])


def relative_error(got, want):
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


# (output stride, input size, strided_padding, whether it must match TF): both rules agree on odd sizes.
CASES = [(16, EVEN, "same", True), (16, EVEN, "fixed", False), (16, ODD, "same", True),
         (16, ODD, "fixed", True), (32, EVEN, "same", True)]


def test_strided_padding_same_computes_what_tf_mobilenet_v2_computes(checkpoint):
  values, variables, info = checkpoint
  assert info["strided_padding"] == "same"  # what the converter records for official MobileNetV2
  rng = np.random.default_rng(0)
  inputs = {size: rng.uniform(0, 255, (2, *size, 3)).astype(np.float32) for size in (EVEN, ODD)}
  references = {}
  for output_stride, size, padding, matches in CASES:
    images = inputs[size]
    if (output_stride, size) not in references:
      x = images * np.float32(2 / 255) - np.float32(1)  # DeepLab's own preprocessing, in [-1, 1]
      references[output_stride, size] = tf_mobilenet_v2(values, x, output_stride)
    got = ours(variables, info, images, padding, output_stride)
    errors = [relative_error(g, w) for g, w in zip(got, references[output_stride, size])]
    print(f"OS{output_stride} {size} {padding}: max |ours - TF| / max |TF| (features, low_level) {errors}")
    if matches:  # float32 rounding over 17 units: ~1.5e-5 measured (AVX2)
      assert max(errors) < 1e-4, (output_stride, size, padding, errors)
    else:  # fixed_padding shifts every strided window by one pixel
      assert min(errors) > 0.05, (output_stride, size, padding, errors)
