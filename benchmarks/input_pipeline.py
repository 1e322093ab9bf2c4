"""Training input throughput: images/s of the real tf.data pipeline at a 513 crop from VOC-sized JPEGs.

  python benchmarks/input_pipeline.py [--images=200 --crop=513 --batch=16 --batches=40]

Builds a folder data set of generated 500x375-ish JPEGs (VOC's typical size and file size: smooth
regions, edges and grain) in a temporary data dir, then times `input_pipeline.train_dataset` with the
VOC recipe's augmentation (scales 0.5-2.0, pad, crop, flip). Needs no accelerator: it measures whether
the host keeps one fed. The last line is one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 200, "Distinct images in the generated data set.")
flags.DEFINE_integer("crop", 513, "Training crop side.")
flags.DEFINE_integer("batch", 16, "Batch size (one process).")
flags.DEFINE_integer("batches", 40, "Timed batches, after warm-up.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first (tf.data start-up, buffers filling).")
flags.DEFINE_string("data_dir", None, "Reuse a data dir from an earlier run (default: a temp dir).")


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Smooth color regions with edges and grain: JPEG sizes like VOC's (~100 KB at 500x375)."""
  coarse = rng.uniform(0, 255, (height // 24 + 2, width // 24 + 2, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  y, x = np.mgrid[0:height, 0:width]
  for _ in range(6):  # a few hard-edged objects
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def make_folder(root: str, count: int, num_classes: int = 21) -> float:
  """`count` JPEG + PNG mask pairs and a train.txt; returns the mean JPEG size in KB."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "masks"), exist_ok=True)
  sizes = []
  for k in range(count):
    height, width = (375, 500) if k % 3 else (500, 375)  # VOC: mostly landscape
    path = os.path.join(root, "images", f"{k:05d}.jpg")
    Image.fromarray(_photo_like(rng, height, width)).save(path, quality=90)
    sizes.append(os.path.getsize(path) / 1024)
    mask = rng.integers(0, num_classes, (height // 32 + 1, width // 32 + 1)).astype(np.uint8)
    Image.fromarray(mask).resize((width, height), Image.NEAREST).save(
        os.path.join(root, "masks", f"{k:05d}.png"))
  with open(os.path.join(root, "train.txt"), "w") as f:
    f.write("".join(f"{k:05d}\n" for k in range(count)))
  return float(np.mean(sizes))


def main(argv):
  del argv
  from deeplab_jax import config as config_lib
  from deeplab_jax import datasets, input_pipeline

  work = FLAGS.data_dir or tempfile.mkdtemp(prefix="deeplab_input_bench_")
  data_dir = os.path.join(work, "tfds")
  manual = os.path.join(work, "manual")
  kb = None
  if not os.path.exists(os.path.join(manual, "train.txt")):
    kb = make_folder(manual, FLAGS.images)
  datasets.prepare("folder_segmentation", manual, data_dir, num_classes=21)

  config = config_lib.default_config()  # the VOC recipe's augmentation
  config.dataset.name, config.dataset.data_dir = "folder_segmentation", data_dir
  config.dataset.train_split = "train"
  config.input.crop_size = (FLAGS.crop, FLAGS.crop)
  config.train.batch_size = FLAGS.batch
  config.input.shuffle_buffer = FLAGS.images
  builder = input_pipeline.load_builder(config)
  batches = input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config))
  for _ in range(FLAGS.warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(batches)
  seconds = time.perf_counter() - start
  assert batch["image"].shape == (FLAGS.batch, FLAGS.crop, FLAGS.crop, 3)
  images_per_s = FLAGS.batches * FLAGS.batch / seconds
  print(f"input pipeline: {images_per_s:.1f} images/s at {FLAGS.crop}x{FLAGS.crop}, batch "
        f"{FLAGS.batch}, {os.cpu_count()} CPUs")
  print(json.dumps({"images_per_s": round(images_per_s, 1), "crop": FLAGS.crop, "batch": FLAGS.batch,
                    "timed_batches": FLAGS.batches, "cpus": os.cpu_count(),
                    "mean_jpeg_kb": None if kb is None else round(kb, 1), "data_dir": work}))


if __name__ == "__main__":
  app.run(main)
