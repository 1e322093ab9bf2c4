"""Build a data set into a TFDS data dir from its manual download.

  python -m deeplab_jax.datasets.prepare voc2012_segmentation --manual_dir=~/downloads --data_dir=~/tfds
  python -m deeplab_jax.datasets.prepare ade20k --manual_dir=... --data_dir=gs://BUCKET/tfds
  python -m deeplab_jax.datasets.prepare cityscapes --manual_dir=... --data_dir=...
  python -m deeplab_jax.datasets.prepare folder_segmentation --manual_dir=MY_DATA --data_dir=... \
      --num_classes=5 [--ignore_label=255]

Checks that the manual dir holds every file first and names the missing ones and where to get them.
Then trains can use `--config.dataset.data_dir=<data_dir>`.
"""
from __future__ import annotations

from absl import app, flags

from deeplab_jax import console, datasets, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("manual_dir", None, "Folder holding the downloaded archives (or their contents).")
flags.DEFINE_string("data_dir", None, "TFDS data dir to build into (local or gs://); default: TFDS's.")
flags.DEFINE_integer("num_classes", None, "folder_segmentation only: the number of classes.")
flags.DEFINE_integer("ignore_label", 255, "folder_segmentation only: the mask value to ignore.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"give one data set name: {', '.join(sorted(datasets.DATASETS))}")

  def run():
    console.setup(FLAGS.verbosity)  # details to <data dir>/<name>/.../prepare.log; --verbosity=1: live
    return datasets.prepare(argv[1], FLAGS.manual_dir, FLAGS.data_dir, num_classes=FLAGS.num_classes,
                            ignore_label=FLAGS.ignore_label)

  sizes = runtime.run_command(run, compile_cache=False)
  splits = ", ".join(f"{split} {count:,}" for split, count in sorted(sizes.items()))
  print(f"deeplab_jax: prepared {argv[1]} in {FLAGS.data_dir or 'the TFDS default data dir'}: {splits}")


if __name__ == "__main__":
  runtime.run_app(main)
