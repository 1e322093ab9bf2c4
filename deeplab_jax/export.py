"""Export a trained DeepLab as a TensorFlow SavedModel (jax2tf), for TF Serving and TF users.

  python -m deeplab_jax.export --workdir=/tmp/deeplab_shapes --output=/tmp/deeplab_shapes_savedmodel
  python -m deeplab_jax.export --weights=deeplabv3_pascal_train_aug_2018_01_04.tar.gz --output=/tmp/voc

The `serving_default` signature takes `images`, a uint8 batch (B, H, W, 3) of any batch size and any
H, W up to the eval crop, and returns `labels`, uint8 (B, H, W) class ids. Inside, the batch is padded
with 127.5 to the eval crop (`config.eval.crop_size`, where the network is compiled), as the official
evaluation does, and the labels are cropped back. Larger images: tile or resize them first, or use
`deeplab_jax.infer.Predictor`. The network is serialized as StableHLO (jax2tf native serialization),
so the SavedModel runs in TensorFlow and TF Serving on CPU and GPU; TFLite cannot run that op.

The depthwise convs are serialized with a portable formulation whatever `config.model.depthwise_impl`
says: "native" (what "auto" picks on one CPU) is a custom call into this package's C++ library, which
a SavedModel cannot carry and jax.export refuses. "shift" (the default here: plain slices and
multiply-adds, fast on XLA:CPU and fine on GPU) or "grouped" (`feature_group_count`, the reference;
cuDNN's depthwise on GPU, slow on XLA:CPU) compute the same function.
"""
from __future__ import annotations

from absl import flags
from etils import epath
import jax.numpy as jnp

from deeplab_jax import console, infer, runtime
from deeplab_jax.errors import ConfigError

# Formulations made of standard ops only, so jax.export can serialize them (see the docstring).
PORTABLE_DEPTHWISE = ("shift", "grouped")


def export(predictor: infer.Predictor, output, depthwise_impl: str = "shift") -> epath.Path:
  """Write the SavedModel of `predictor`'s network (at its eval output stride) to `output`."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  if depthwise_impl not in PORTABLE_DEPTHWISE:
    raise ConfigError(f"depthwise_impl={depthwise_impl!r} cannot be serialized into a SavedModel; "
                      f"use one of {', '.join(PORTABLE_DEPTHWISE)}")
  crop_h, crop_w = predictor.window
  model = predictor.model.clone(depthwise_impl=depthwise_impl)
  variables = predictor.variables

  def labels_at_crop(images):  # float32 (B, crop_h, crop_w, 3) in [0, 255]
    logits = infer._forward(model, variables, images)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  network = jax2tf.convert(labels_at_crop, polymorphic_shapes=[f"(b, {crop_h}, {crop_w}, 3)"],
                           with_gradient=False)

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve(images):
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    check = tf.debugging.assert_less_equal(
        tf.stack([height, width]), tf.constant([crop_h, crop_w]),
        message=f"images must be at most {crop_h}x{crop_w} (the eval crop); tile or resize them")
    with tf.control_dependencies([check]):
      padded = tf.pad(tf.cast(images, tf.float32),
                      [[0, 0], [0, crop_h - height], [0, crop_w - width], [0, 0]],
                      constant_values=infer.PAD_VALUE)
    padded = tf.ensure_shape(padded, [None, crop_h, crop_w, 3])
    labels = network(padded)  # float32: the 127.5 padding is not a uint8 value
    return {"labels": labels[:, :height, :width]}

  module = tf.Module()
  module.serve = serve
  output = epath.Path(output)
  tf.saved_model.save(module, str(output), signatures={"serving_default": serve})
  return output


FLAGS = flags.FLAGS


def _define_flags():
  infer.define_source_flags()
  flags.DEFINE_string("output", None, "SavedModel directory to write.")
  flags.DEFINE_integer("output_stride", None, "Eval output stride (8, 16, 32; default: the config's).")
  flags.DEFINE_enum("depthwise_impl", "shift", PORTABLE_DEPTHWISE,
                    "How the depthwise convs are serialized: shift (fast on CPU) or grouped.")
  flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  infer.check_source_flags(FLAGS)

  def run():
    console.setup(FLAGS.verbosity)  # details to OUTPUT/export.log; --verbosity=1 shows them live
    predictor = infer.predictor_from_flags(FLAGS, output_stride=FLAGS.output_stride)
    path = export(predictor, FLAGS.output, FLAGS.depthwise_impl)
    console.open_log(path, "export.log")  # once the SavedModel is whole: a failed export writes nothing
    return predictor, path

  predictor, path = runtime.run_command(run)
  source = f"step {predictor.step}" if FLAGS.workdir else FLAGS.weights
  print(f"deeplab_jax: exported {source} (output stride {predictor.output_stride}, "
        f"images up to {predictor.window[0]}x{predictor.window[1]}, depthwise convs as "
        f"{FLAGS.depthwise_impl!r}: portable StableHLO) to {path}")


if __name__ == "__main__":
  _define_flags()
  runtime.run_app(main)
