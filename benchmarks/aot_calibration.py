"""The predictor's calibration point: a plain ImageNet ResNet-50 train step compiled for a TPU slice.

  python benchmarks/aot_calibration.py --topology=v5e:2x2 --batch=512

ResNet-50 in the torchvision layout (this project's `resnet_50` backbone at output stride 32, global
average pooling, a 1000-way dense layer), softmax cross-entropy, SGD with momentum, BatchNorm
synchronized over the global batch, bfloat16 activations and float32 parameters, 224x224. Real
JAX ResNet-50 trainings reach roughly 18% of a TPU chip's peak (../shared/PERF_NOTES.md); its FLOP per
byte is what the DeepLab steps are measured against. Prints the same figures as
benchmarks/tpu_ops.py's totals, then one JSON object.
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from deeplab_jax import accelerators, aot, sharding
  from deeplab_jax.models import layers
  from deeplab_jax.models.resnet import ResNet
  import tpu_ops

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, images, train: bool):
      with layers.layer_options(layers.LayerOptions(platform="tpu")):
        x = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0).astype(jnp.bfloat16)
        features, _ = ResNet(variant="resnet_50", output_stride=32, dtype=jnp.bfloat16,
                             name="backbone")(x, train)
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(1000, name="fc")(pooled)

  model = Classifier()
  tx = optax.sgd(0.1, momentum=0.9)
  target = accelerators.parse(FLAGS.topology)
  mesh = sharding.create_mesh(accelerators.devices(target))
  size, batch = FLAGS.size, FLAGS.batch

  def init():
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    return variables["params"], variables["batch_stats"], tx.init(variables["params"])

  abstract = jax.eval_shape(init)
  replicated, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state_sh = jax.tree.map(lambda _: replicated, abstract)

  def step(state, images, labels):
    params, stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                    mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  fn = jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh), out_shardings=(state_sh, replicated),
               donate_argnums=(0,))
  args = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh),
          jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=batch_sh),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh))
  compiled = aot.compile_and_measure(fn, args, "train", batch)
  if not compiled.fits:
    raise SystemExit(f"batch {batch} does not fit {FLAGS.topology}")
  insts = tpu_ops.instructions(compiled.hlo)
  hbm = sum(i.hbm for i in insts)
  per_device = batch / target.devices
  result = {"topology": FLAGS.topology, "global_batch": batch, "size": size,
            "flops_per_image": compiled.flops / per_device,
            "bytes_per_image": compiled.bytes_accessed / per_device,
            "flop_per_byte": compiled.flops / compiled.bytes_accessed,
            "hbm_estimate_per_image": hbm / per_device, "flop_per_hbm_byte": compiled.flops / hbm,
            "predicted_mfu": min(1.0, compiled.flops / compiled.bytes_accessed / target.chip.ridge),
            "compile_s": round(compiled.compile_s, 1)}
  print(f"ResNet-50 {size}x{size}, global batch {batch} on {FLAGS.topology}: "
        f"{result['flops_per_image'] / 1e9:.1f} GFLOP and {result['bytes_per_image'] / 1e9:.2f} GB (cost "
        f"analysis) per image, {result['flop_per_byte']:.1f} FLOP/byte, predicted MFU "
        f"{100 * result['predicted_mfu']:.1f}%; HBM estimate {result['hbm_estimate_per_image'] / 1e9:.2f} GB, "
        f"{result['flop_per_hbm_byte']:.1f} FLOP per HBM byte")
  print(json.dumps(result))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  flags.DEFINE_string("topology", "v5e:2x2", "The slice (deeplab_jax.accelerators).")
  flags.DEFINE_integer("batch", 512, "Global batch.")
  flags.DEFINE_integer("size", 224, "Square image size.")
  app.run(main)
