"""Pretrained checkpoints in the real formats, with random values (real weights cannot be downloaded
here). The TF names and shapes come from the official architectures as written out below (the
tensorflow/models research/deeplab scopes), not from deeplab_jax.weights, whose mapping they test.
"""
from __future__ import annotations

import json
import struct

import numpy as np

BN = ("gamma", "beta", "moving_mean", "moving_variance")

# Official xception.py: (block scope, depth_list, skip connection, units); root convs 32 and 64.
_X_EXIT = [("middle_flow/block1", (728,) * 3, "sum", 16), ("exit_flow/block1", (728, 1024, 1024), "conv", 1),
           ("exit_flow/block2", (1536, 1536, 2048), "none", 1)]
XCEPTION = {
    "xception_41": [("entry_flow/block1", (128,) * 3, "conv", 1), ("entry_flow/block2", (256,) * 3, "conv", 1),
                    ("entry_flow/block3", (728,) * 3, "conv", 1), ("middle_flow/block1", (728,) * 3, "sum", 8),
                    *_X_EXIT[1:]],
    "xception_65": [("entry_flow/block1", (128,) * 3, "conv", 1), ("entry_flow/block2", (256,) * 3, "conv", 1),
                    ("entry_flow/block3", (728,) * 3, "conv", 1), *_X_EXIT],
}
# Official mobilenet_v2.py conv_defs after the 32-channel 'Conv': (expansion, channels, repeats, stride).
MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


def _conv(out, name, shape):
  out[f"{name}/weights"] = shape
  for leaf in BN:
    out[f"{name}/BatchNorm/{leaf}"] = (shape[-1],)


def _depthwise(out, name, channels):
  out[f"{name}/depthwise_weights"] = (3, 3, channels, 1)
  for leaf in BN:
    out[f"{name}/BatchNorm/{leaf}"] = (channels,)


def xception(scope="xception_65", imagenet_classes=None) -> dict[str, tuple]:
  out = {}
  _conv(out, f"{scope}/entry_flow/conv1_1", (3, 3, 3, 32))
  _conv(out, f"{scope}/entry_flow/conv1_2", (3, 3, 32, 64))
  cin = 64
  for block, depths, skip, units in XCEPTION[scope]:
    for u in range(units):
      p = f"{scope}/{block}/unit_{u + 1}/xception_module"
      c = cin
      for i, d in enumerate(depths):
        _depthwise(out, f"{p}/separable_conv{i + 1}_depthwise", c)
        _conv(out, f"{p}/separable_conv{i + 1}_pointwise", (1, 1, c, d))
        c = d
      if skip == "conv":
        _conv(out, f"{p}/shortcut", (1, 1, cin, depths[-1]))
      cin = depths[-1]
  if imagenet_classes:
    out[f"{scope}/logits/weights"] = (1, 1, 2048, imagenet_classes)
    out[f"{scope}/logits/biases"] = (imagenet_classes,)
  return out


def resnet_beta(scope="resnet_v1_50", imagenet_classes=None) -> dict[str, tuple]:
  """Official resnet_v1_beta: a 3x3 stem of 64, 64, 128; bottleneck_v1 units [3, 4, 6, 3] (50) or
  [3, 4, 23, 3] (101) of widths 64-512, a shortcut conv where the depth changes."""
  out = {}
  for i, (cin, cout) in enumerate(((3, 64), (64, 64), (64, 128))):
    _conv(out, f"{scope}/conv1_{i + 1}", (3, 3, cin, cout))
  units = (3, 4, 6, 3) if scope.endswith("50") else (3, 4, 23, 3)
  cin = 128
  for b, (n, width) in enumerate(zip(units, (64, 128, 256, 512))):
    for u in range(n):
      p = f"{scope}/block{b + 1}/unit_{u + 1}/bottleneck_v1"
      if cin != 4 * width:
        _conv(out, f"{p}/shortcut", (1, 1, cin, 4 * width))
      _conv(out, f"{p}/conv1", (1, 1, cin, width))
      _conv(out, f"{p}/conv2", (3, 3, width, width))
      _conv(out, f"{p}/conv3", (1, 1, width, 4 * width))
      cin = 4 * width
  if imagenet_classes:
    out[f"{scope}/logits/weights"] = (1, 1, 2048, imagenet_classes)
    out[f"{scope}/logits/biases"] = (imagenet_classes,)
  return out


def _make_divisible(v, divisor=8):
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


def mobilenet_v2(depth_multiplier=1.0, imagenet_classes=None) -> dict[str, tuple]:
  """(variables, the channels of layer_4/depthwise_output, the last layer's channels)."""
  out = {}
  d = lambda c: _make_divisible(c * depth_multiplier)
  cin = d(32)
  _conv(out, "MobilenetV2/Conv", (3, 3, 3, cin))
  i, low_level = 0, None
  for t, c, n, _ in MOBILENET_V2:
    for _ in range(n):
      p = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
      inner = cin if t == 1 else _make_divisible(cin * t)
      if t != 1:
        _conv(out, f"{p}/expand", (1, 1, cin, inner))
      _depthwise(out, f"{p}/depthwise", inner)
      _conv(out, f"{p}/project", (1, 1, inner, d(c)))
      if i == 2:  # slim's layer_4 (layer_1 is 'Conv'): the decoder's low-level feature
        low_level = inner
      cin, i = d(c), i + 1
  if imagenet_classes:
    _conv(out, "MobilenetV2/Conv_1", (1, 1, cin, 1280))
    out["MobilenetV2/Logits/Conv2d_1c_1x1/weights"] = (1, 1, 1280, imagenet_classes)
    out["MobilenetV2/Logits/Conv2d_1c_1x1/biases"] = (imagenet_classes,)
  return out, low_level, cin


def deeplab_head(features, low_level, num_classes=21, rates=3, decoder=True) -> dict[str, tuple]:
  """model.py's ASPP (separable), decoder (separable) and logits."""
  out = {}
  _conv(out, "image_pooling", (1, 1, features, 256))
  _conv(out, "aspp0", (1, 1, features, 256))
  for i in range(1, rates + 1):
    _depthwise(out, f"aspp{i}_depthwise", features)
    _conv(out, f"aspp{i}_pointwise", (1, 1, features, 256))
  _conv(out, "concat_projection", (1, 1, 256 * (rates + 2), 256))
  if decoder:
    _conv(out, "decoder/feature_projection0", (1, 1, low_level, 48))
    for i, c in enumerate((304, 256)):
      _depthwise(out, f"decoder/decoder_conv{i}_depthwise", c)
      _conv(out, f"decoder/decoder_conv{i}_pointwise", (1, 1, c, 256))
  out["logits/semantic/weights"] = (1, 1, 256, num_classes)
  out["logits/semantic/biases"] = (num_classes,)
  return out


def trainable_values(shapes: dict[str, tuple]) -> int:
  return sum(int(np.prod(s)) for n, s in shapes.items() if not n.endswith(("moving_mean", "moving_variance")))


def random_values(shapes: dict[str, tuple], seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {n: (rng.uniform(0.5, 1.5, s) if n.endswith("moving_variance") else
              rng.standard_normal(s, dtype=np.float32) * 0.05).astype(np.float32)
          for n, s in shapes.items()}


def signal_values(shapes: dict[str, tuple], seed=0) -> dict[str, np.ndarray]:
  """`random_values` whose features depend on the input: N(0, 0.05) kernels and gammas shrink the
  signal layer by layer until a deep network's features are BatchNorm's constants whatever the input
  (padding included). Kernels get He scale, gammas 1 + their draw."""
  values = random_values(shapes, seed)
  for name, value in values.items():
    if name.endswith("weights"):  # conv (kh, kw, in, out) or depthwise (kh, kw, C, 1): fan-in
      fan_in = np.prod(value.shape[:2]) * (1 if name.endswith("depthwise_weights") else value.shape[2])
      values[name] = (value / 0.05 * np.sqrt(2 / fan_in)).astype(np.float32)
    elif name.endswith("gamma"):
      values[name] = 1 + value
  return values


def write_tf_checkpoint(prefix, values: dict[str, np.ndarray], training_state=True) -> None:
  """A TF1 name-based checkpoint (prefix.index + prefix.data-00000-of-00001), as tf.train.Saver
  writes it, plus what a training run leaves beside the model: global_step and Momentum slots."""
  import tensorflow as tf
  values = dict(values)
  if training_state:
    values["global_step"] = np.int64(30000)
    for name in list(values)[:3]:
      values[f"{name}/Momentum"] = np.zeros_like(values[name])
  names = sorted(values)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(values[n]) for n in names])


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  """The safetensors layout, written by hand (no torch here)."""
  codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
  header, offset, chunks = {}, 0, []
  for name, value in tensors.items():
    raw = np.ascontiguousarray(value).tobytes()
    header[name] = {"dtype": codes[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
