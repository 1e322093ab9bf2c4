"""tf.data input: SPEC section 8 augmentation, padded evaluation batches, per-process rows, exact resume.

Training order is a function of (seed, step) only, whatever the number of processes: epoch e is the
split shuffled with a seed derived from e, global batch N is examples [N * B, (N + 1) * B) of that
stream (each process decodes its rows of it), and example k's augmentation draws from a stateless seed
derived from k. A run resumed at step N, on any number of hosts, therefore sees the same batch N as an
uninterrupted run, replaying at most one epoch of encoded reads (no decoding) to get there.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from deeplab_jax import config as config_lib
from deeplab_jax import console, datasets, sliding_window
from deeplab_jax.errors import ConfigError, DataError

# The official code pads images with the mean pixel, which its normalization maps to 0.
IMAGE_PAD_VALUE = 127.5
_MAX_EPOCHS = 2**40
_LABEL_MARKER = "LABEL_OUT_OF_RANGE"


def load_builder(config) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset.name`, preparing generated data sets on first use."""
  name, data_dir = config.dataset.name, config.dataset.data_dir or None
  shown_dir = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(datasets.missing_message(name, shown_dir)) from None
  if not builder.is_prepared():
    if not datasets.entry(name).generated:
      raise DataError(datasets.missing_message(name, shown_dir))
    builder = _build_generated(builder, name, data_dir)
  resolve_from_data(config, builder)
  _check_classes(builder, config)
  return builder


EVAL_SPLITS = ("val", "validation", "test")


def resolve_from_data(config, builder) -> None:
  """Fill the dataset fields left None (configs/folder.py) from the prepared data: its stored class
  count and ignore label, its "train" split and its first of `EVAL_SPLITS`. One line if it has none."""
  d, stored = config.dataset, dict(builder.info.metadata or {})
  where = builder.info.full_name
  if d.num_classes is None:
    count = stored.get("num_classes", datasets.entry(d.name).num_classes)
    if count is None:
      raise ConfigError(f"config.dataset.num_classes is None (take the data's) but {where} stores no "
                        f"class count; set --config.dataset.num_classes")
    d.num_classes = int(count)
  if d.ignore_label is None:
    d.ignore_label = int(stored.get("ignore_label", 255))
  splits = sorted(builder.info.splits)
  if d.train_split is None:
    if "train" not in splits:
      raise ConfigError(f"config.dataset.train_split is None (take the data's \"train\") but {where} "
                        f"has {', '.join(splits)}; set --config.dataset.train_split")
    d.train_split = "train"
  if d.eval_split is None:
    found = [s for s in EVAL_SPLITS if s in splits]
    if not found:
      raise ConfigError(f"config.dataset.eval_split is None (take the data's {'/'.join(EVAL_SPLITS)}) "
                        f"but {where} has {', '.join(splits)}; set --config.dataset.eval_split")
    d.eval_split = found[0]
  config_lib.check_ignore_label(d)  # the values filled in together


def _build_generated(builder, name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  # Process 0 builds first (a shared gs:// data_dir is then built once); others build their own copy
  # only if they still cannot see it (a local data_dir per host).
  if jax.process_index() == 0:
    logging.info("building %s in %s (first use)", name, builder.data_dir)
    console.say(f"generating {name} in {builder.data_dir} (first use only)")
    start = time.time()
    datasets.download_and_prepare(builder, bars=False)  # these two lines instead of TFDS's
    console.say(f"generated {name} in {time.time() - start:.0f} s")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"prepared {name}")
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    datasets.download_and_prepare(builder, bars=False)
  return builder


def _check_classes(builder, config) -> None:
  """The class count and ignore label stored with the data (or known for it) must be the config's."""
  stored = dict(builder.info.metadata or {})
  num_classes = stored.get("num_classes", datasets.entry(config.dataset.name).num_classes)
  if num_classes is not None and int(num_classes) != int(config.dataset.num_classes):
    raise ConfigError(f"config.dataset.num_classes={config.dataset.num_classes} but "
                      f"{builder.info.full_name} has {num_classes} classes; set it to {num_classes}")
  ignore = stored.get("ignore_label")
  if ignore is not None and int(ignore) != int(config.dataset.ignore_label):
    raise ConfigError(f"config.dataset.ignore_label={config.dataset.ignore_label} but "
                      f"{builder.info.full_name} marks ignored pixels with {ignore}; set it to {ignore}")


def check_split(builder, split: str, field: str) -> None:
  if split not in builder.info.splits:
    raise ConfigError(f"{field}={split!r} is not a split of {builder.info.full_name}; it has "
                      f"{', '.join(sorted(builder.info.splits))}")


def _read(builder, split: str, cache: bool, skip=()) -> tf.data.Dataset:
  """Encoded (image, segmentation, name) triples in a fixed order; decoding waits until after shuffle
  and skip. `skip`: names of examples to leave out (see `undecodable`)."""
  entry = datasets.entry(builder.info.full_name)
  has_name = entry.file_key in builder.info.features
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={entry.image_key: tfds.decode.SkipDecoding(),
                entry.label_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False, skip_prefetch=True))

  def triple(ex):
    name = ex[entry.file_key] if has_name else tf.constant("(unnamed)")
    if name.dtype != tf.string:
      name = tf.strings.as_string(name)
    return ex[entry.image_key], ex[entry.label_key], name

  ds = ds.map(triple, num_parallel_calls=tf.data.AUTOTUNE)
  if skip:
    names = tf.constant(list(skip))
    ds = ds.filter(lambda image, label, name: tf.logical_not(tf.reduce_any(tf.equal(name, names))))
  return ds.cache() if cache else ds


def undecodable(builder, split: str) -> list[str]:
  """Names of the split's examples whose image or mask does not decode (a truncated or corrupt file
  stored in the data set): one eager pass that decodes every example, for errors and skips only."""
  bad = []
  for image, label, name in _read(builder, split, cache=False):
    try:
      tf.io.decode_image(image, channels=3, expand_animations=False)
      tf.io.decode_png(label, channels=1)
    except tf.errors.InvalidArgumentError:
      bad.append(name.numpy().decode())
  return bad


# A built data set does not change while a process reads it: each split is scanned once per process,
# not at every evaluation.
_SKIPPED: dict[tuple[str, str, str], tuple[str, ...]] = {}


def _skipped(builder, split: str, config) -> tuple[str, ...]:
  """With config.input.skip_undecodable, the split's undecodable examples, counted in the log."""
  if not config.input.skip_undecodable:
    return ()
  key = (str(builder.data_dir), builder.info.full_name, str(split))
  if key not in _SKIPPED:
    bad = _SKIPPED[key] = tuple(undecodable(builder, split))
    if bad:
      logging.warning("skipping %d undecodable example(s) of %s split %s "
                      "(config.input.skip_undecodable): %s", len(bad), builder.info.full_name, split,
                      ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
  return _SKIPPED[key]


def _decoder(builder, config):
  """(encoded image, encoded label, name) -> image (H, W, 3), uint8 label (H, W, 1) in class ids; with
  `config.input.min_resize_value` both are resized to the official range (the image then float32).

  A mask value that is neither a class id nor the ignore label stops the pipeline with the example's
  name (`as_numpy` turns it into one line): training on it would be a silent wrong label.
  """
  table = datasets.entry(builder.info.full_name).label_table
  lookup = None if table is None else tf.constant(table, tf.uint8)
  i = config.input
  min_size, max_size, factor = (i.get(k) for k in ("min_resize_value", "max_resize_value",
                                                   "resize_factor"))
  num_classes, ignore = int(config.dataset.num_classes), int(config.dataset.ignore_label)
  marker = f"{_LABEL_MARKER}({builder.info.full_name}, {num_classes}, {ignore})"

  def decode(image, label, name):
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
    label = tf.io.decode_png(label, channels=1)
    if lookup is not None:
      label = tf.gather(lookup, tf.cast(label, tf.int32))
    bad = tf.logical_and(label >= num_classes, label != ignore)
    check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)),
                                [marker, name, tf.reduce_max(tf.where(bad, label, 0))])
    with tf.control_dependencies([check]):
      label = tf.identity(label)
    if min_size is not None:
      image, label = resize_to_range(image, label, int(min_size), max_size, factor)
    return image, label

  return decode


def resize_to_range(image, label, min_size: int, max_size: int | None = None,
                    factor: int | None = None):
  """The official `resize_to_range`: the shorter side to `min_size`, unless the longer one would then
  exceed `max_size` (the longer side goes to `max_size` instead); then each side up to k * factor + 1.
  Image bilinear (float32), label nearest, both with align_corners."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  size = tf.floor(shape * (min_size / tf.reduce_min(shape)))
  if max_size is not None:
    small = tf.floor(shape * (max_size / tf.reduce_max(shape)))
    size = tf.where(tf.reduce_max(size) > max_size, small, size)
  size = tf.cast(size, tf.int32)
  if factor is not None:
    size += (factor - (size - 1) % factor) % factor
  image = _resize_bilinear(tf.cast(image, tf.float32), size)
  label = _resize_nearest(label, size)
  return image, label


def _resize_bilinear(image, size):
  """(H, W, C) float32 to `size`, align_corners as the official code: the op that TF1's
  `tf.compat.v1.image.resize_bilinear` runs, called directly (the v1 wrapper prints a deprecation
  warning, and `tf.image.resize` has no align_corners)."""
  return tf.raw_ops.ResizeBilinear(images=image[None], size=size, align_corners=True,
                                   half_pixel_centers=False)[0]


def _resize_nearest(label, size):
  """(H, W, 1) labels to `size`, nearest with align_corners (see `_resize_bilinear`)."""
  return tf.raw_ops.ResizeNearestNeighbor(images=label[None], size=size, align_corners=True,
                                          half_pixel_centers=False)[0]


def augment(image, label, seed, *, crop_size, min_scale, max_scale, scale_step, flip, ignore_label):
  """SPEC section 8: random scale (bilinear image, nearest label, align_corners as the official code),
  pad bottom/right to the crop (127.5 / ignore), random crop, horizontal flip with p = 0.5.

  image uint8 (H, W, 3), label uint8 (H, W, 1), seed int64 (2,) -> float32 image, uint8 label at crop.
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  crop_h, crop_w = crop_size
  image = tf.cast(image, tf.float32)
  if not min_scale == max_scale == 1.0:
    num_scales = int(round((max_scale - min_scale) / scale_step)) + 1
    index = tf.random.stateless_uniform([], seeds[0], 0, num_scales, dtype=tf.int32)
    scale = min_scale + tf.cast(index, tf.float32) * scale_step
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.cast(shape * scale, tf.int32)  # floor, as the official code
    image = _resize_bilinear(image, size)
    label = _resize_nearest(label, size)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  pad_h, pad_w = tf.maximum(crop_h - height, 0), tf.maximum(crop_w - width, 0)
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=IMAGE_PAD_VALUE)
  label = tf.pad(label, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=ignore_label)
  height, width = height + pad_h, width + pad_w
  top = tf.random.stateless_uniform([], seeds[1], 0, height - crop_h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, width - crop_w + 1, dtype=tf.int32)
  image = image[top:top + crop_h, left:left + crop_w]
  label = label[top:top + crop_h, left:left + crop_w]
  if flip:
    do_flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    image = tf.cond(do_flip, lambda: image[:, ::-1], lambda: image)
    label = tf.cond(do_flip, lambda: label[:, ::-1], lambda: label)
  image = tf.ensure_shape(image, (crop_h, crop_w, 3))
  label = tf.ensure_shape(label, (crop_h, crop_w, 1))
  return image, label


def _local_batch(global_batch: int, field: str) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ConfigError(f"{field}={global_batch} is not divisible by the {count} processes; "
                      f"use a multiple of {count}")
  return global_batch // count


def train_dataset(builder, config, start_step: int = 0) -> tf.data.Dataset:
  """This process's training batches from `start_step` on: {"image": f32 (b, h, w, 3), "label": u8}."""
  split = config.dataset.train_split
  check_split(builder, split, "config.dataset.train_split")
  global_batch = int(config.train.batch_size)
  local_batch = _local_batch(global_batch, "config.train.batch_size")
  index = jax.process_index()
  # Every process reads the whole split's encoded records in one seeded order (the global stream)
  # and decodes only its rows of each global batch: the batches, and so the run, are the same for
  # any number of processes (a job resumed on another slice size continues exactly), at the cost of
  # each host reading every encoded record (DeepLab's data sets are small: VOC train_aug ~1 GB).
  skip = _skipped(builder, split, config)
  size = builder.info.splits[split].num_examples - len(skip)
  if size <= 0:
    raise DataError(f"split {split!r} of {builder.info.full_name} has no "
                    f"{'decodable ' if skip else ''}examples; check config.dataset.train_split")
  raw = _read(builder, split, config.input.cache, skip)
  seed = int(config.seed)
  buffer = int(config.input.shuffle_buffer)

  def epoch(e):
    # Each epoch's order depends only on (seed, e), so any epoch can be started directly.
    return raw.shuffle(buffer, seed=tf.cast(seed, tf.int64) * 1_000_003 + e)

  first = int(start_step) * global_batch
  start_epoch, offset = divmod(first, size)
  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch).skip(offset)
  # Example k of the global stream (counting from step 0) gets augmentation seed (seed, k).
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(first, 2**62))
  if local_batch != global_batch:  # this process's rows [index * b, (index + 1) * b) of each batch
    ds = ds.filter(lambda example, k: (k % global_batch) // local_batch == index)
  aug = dict(crop_size=tuple(int(v) for v in config.input.crop_size),
             min_scale=float(config.input.min_scale), max_scale=float(config.input.max_scale),
             scale_step=float(config.input.scale_step), flip=bool(config.input.flip),
             ignore_label=int(config.dataset.ignore_label))

  decode = _decoder(builder, config)

  def prepare(example, k):
    image, label = decode(*example)
    image, label = augment(image, label, tf.stack([tf.cast(seed, tf.int64), k]), **aug)
    return {"image": image, "label": label[..., 0]}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def train_batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch's shapes and dtypes, as `train_dataset` yields them on all processes
  together (what deeplab_jax.aot compiles the train step for)."""
  batch, (h, w) = int(config.train.batch_size), (int(v) for v in config.input.crop_size)
  return {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch, h, w), jnp.uint8)}


def eval_batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global evaluation batch's shapes and dtypes, as `eval_batches` yields them."""
  batch, (h, w) = int(config.eval.batch_size), (int(v) for v in config.eval.crop_size)
  return {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch, h, w), jnp.uint8),
          "mask": jax.ShapeDtypeStruct((batch,), jnp.bool_),
          "more": jax.ShapeDtypeStruct((batch,), jnp.bool_)}


def _eval_shards(builder, config) -> list[str]:
  """The eval split cut into one disjoint shard per process (`even_splits`, sizes differing by <= 1)."""
  split = config.dataset.eval_split
  check_split(builder, split, "config.dataset.eval_split")
  return tfds.even_splits(split, n=jax.process_count(), drop_remainder=False)


@dataclasses.dataclass(frozen=True)
class Window:
  """A row of an evaluation batch that holds one sliding window of a larger image: where the window
  lies, and the whole image, so that the host can average its windows' logits and count its pixels
  once its `last` window has passed (windows of an image come in order, in one or more batches)."""
  index: int  # the image's position in this process's shard
  top: int
  left: int
  height: int
  width: int
  last: bool
  image: np.ndarray  # (H, W, 3)
  label: np.ndarray  # (H, W) uint8


def runs_whole(shape, crop) -> bool:
  """Whether an image of `shape` is padded to the eval crop and runs whole (else: sliding windows)."""
  return shape[0] <= crop[0] and shape[1] <= crop[1]


def eval_window_stride(config) -> tuple[int, int]:
  """The step between sliding windows of `config.eval.crop_size` (configs written before
  `window_overlap` existed: a third, the Predictor's default)."""
  overlap = config.eval.get("window_overlap", sliding_window.DEFAULT_OVERLAP)
  return sliding_window.stride(tuple(int(v) for v in config.eval.crop_size), float(overlap))


def eval_batches(builder, config) -> Iterator[tuple[dict, list[Window | None]]]:
  """This process's evaluation batches, each a (local batch, per-row windows) pair.

  Each row is `config.eval.crop_size`: a whole image padded to it (`mask` set: the eval step counts its
  pixels on the device, as before any image was larger than the crop), or one sliding window of a
  larger image (its `Window`: the host averages the windows' logits, `sliding_window`), or filler
  (neither) in the last batch. Processes read disjoint `even_splits` shards and so make different
  numbers of batches: `more` says whether this process has another batch after this one, and every
  process keeps stepping (with `filler_batch`) while any has (train.Evaluator).
  """
  local_batch = _local_batch(config.eval.batch_size, "config.eval.batch_size")
  crop = tuple(int(v) for v in config.eval.crop_size)
  step = eval_window_stride(config)
  examples = as_numpy(eval_examples(builder, config), builder, config.dataset.eval_split)

  def all_rows():  # (image or window, its label, Window or None for a whole image)
    for index, example in enumerate(examples):
      image, label = example["image"], example["label"]
      if runs_whole(label.shape, crop):
        yield image, label, None
        continue
      tiles = sliding_window.tiles(*label.shape, crop, step)
      for k, (top, left, h, w) in enumerate(tiles):
        yield (image[top:top + h, left:left + w], label[top:top + h, left:left + w],
               Window(index, top, left, h, w, k == len(tiles) - 1, image, label))

  stream = all_rows()
  pending = next(stream, None)
  while pending is not None:
    rows = [pending, *itertools.islice(stream, local_batch - 1)]
    pending = next(stream, None)
    # Filler everywhere, then each row written over its top-left corner: the rest stays padding
    # (the mean pixel, ignored labels), the official evaluation's bottom/right padding.
    batch = filler_batch(config)
    for k, (image, label, window) in enumerate(rows):
      batch["image"][k, :image.shape[0], :image.shape[1]] = image
      batch["label"][k, :label.shape[0], :label.shape[1]] = label
      batch["mask"][k] = window is None
    batch["more"][:] = pending is not None
    yield batch, [window for _, _, window in rows] + [None] * (local_batch - len(rows))


def filler_batch(config) -> dict:
  """A local eval batch of rows that count nothing: a process with no images left steps with it
  while another process still has some (and `eval_batches` fills its batches into one)."""
  size = _local_batch(config.eval.batch_size, "config.eval.batch_size")
  crop = tuple(int(v) for v in config.eval.crop_size)
  return {"image": np.full((size, *crop, 3), IMAGE_PAD_VALUE, np.float32),
          "label": np.full((size, *crop), int(config.dataset.ignore_label), np.uint8),
          "mask": np.zeros(size, bool), "more": np.zeros(size, bool)}


def eval_examples(builder, config) -> tf.data.Dataset:
  """This process's evaluation examples whole and unpadded, {"image", "label" (H, W)}, for strategies
  (multi-scale, flip, sliding window) that need each image at its own size."""
  shard = _eval_shards(builder, config)[jax.process_index()]
  decode = _decoder(builder, config)

  def prepare(image, label, name):
    image, label = decode(image, label, name)
    return {"image": image, "label": label[..., 0]}

  ds = _read(builder, shard, cache=False, skip=_skipped(builder, shard, config))
  return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset, builder=None, split: str | None = None) -> Iterator[dict]:
  """NumPy batches; bad data becomes a one-line DataError: a mask value outside the classes, or an
  undecodable image or mask (named after a scan of `split`, when the builder and split are given)."""
  iterator = iter(tfds.as_numpy(ds))
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      error = _data_error(str(e), builder, split)
      if error is None:
        raise
      raise error from None
    yield batch


def _data_error(message: str, builder, split: str | None) -> DataError | None:
  found = re.search(_LABEL_MARKER + r"\((.*?), (\d+), (\d+)\)\] \[(.*?)\] \[(\d+)\]", message)
  if found:
    name, num_classes, ignore, example, value = found.groups()
    return DataError(f"example {example!r} of {name} has mask value {value}, neither a class id below "
                     f"config.dataset.num_classes={num_classes} nor config.dataset.ignore_label="
                     f"{ignore}; fix its mask, or the config if those values are wrong")
  decoding = ("Invalid PNG data", "Invalid JPEG data", "Unknown image file format", "decode",
              "Decode", "corrupt", "truncated")
  if builder is not None and split is not None and any(d in message for d in decoding):
    bad = undecodable(builder, split)
    if bad:
      return DataError(
          f"{len(bad)} example(s) of {builder.info.full_name} split {split} do not decode (a truncated "
          f"or corrupt image or mask), first {bad[0]!r}; rebuild the data set from intact files, or "
          f"set config.input.skip_undecodable=True to skip them (counted in the log)")
  return None
