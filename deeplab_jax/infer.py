"""Segment images with a trained DeepLab: `Predictor` for Python and Colab, `colorize` and `overlay`.

  from deeplab_jax import infer
  predictor = infer.Predictor.from_workdir("/tmp/deeplab_shapes")
  labels = predictor.predict("photo.jpg")          # (H, W) class ids at the image's own size
  infer.overlay(image, labels, alpha=0.5)

Images of any size are padded (127.5, as in training and evaluation) to a size on the model's grid,
rounded up to a multiple of `bucket` plus one, so a folder of mixed sizes compiles a few programs, not
one per image; the prediction is cropped back. Images larger than the eval crop go through a sliding
window with overlap. The paper's inference strategies (Table 3: eval output stride, multi-scale inputs,
left-right flip) average softmax probabilities at the image's size, as the official code does. Only
the network runs on the device; resizing and averaging run in NumPy so that they add no compilations.
"""
from __future__ import annotations

from deeplab_jax import allocator

if __name__ == "__main__":  # first, before jax and TensorFlow load: see allocator.py
  allocator.reexec_with_fast_allocator()

import functools
import json
import math
import os
import time
from typing import Iterable, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from deeplab_jax import checkpoints, console, datasets, sliding_window, visualize
from deeplab_jax.errors import CheckpointError, DataError
from deeplab_jax.models import create_model, upsample_logits
from deeplab_jax.models.layers import scale_dimension

PAD_VALUE = 127.5  # the official mean-pixel padding, 0 after the model's normalization


# --- images in -------------------------------------------------------------------------------------

def load_image(image) -> np.ndarray:
  """A path, PIL image or array -> uint8 RGB (H, W, 3). Grayscale and RGBA are converted, not refused."""
  if isinstance(image, (str, os.PathLike)):
    path = epath.Path(image)
    if not path.exists():
      raise DataError(f"{path} does not exist; give an image file, a folder of images or an array")
    try:
      with Image.open(path.open("rb")) as opened:
        return np.asarray(opened.convert("RGB"))
    except (OSError, SyntaxError):
      raise DataError(f"{path} is not an image PIL can read; give a JPEG, PNG or similar") from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise DataError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
                    f"{array.shape}")
  if array.dtype != np.uint8:
    if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
      array = array * 255.0  # float images in [0, 1]
    array = np.clip(np.round(array), 0, 255).astype(np.uint8)
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  return array[..., :3]  # RGBA: drop alpha


# --- NumPy resizing (align_corners, as the model's) --------------------------------------------------

def _resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  n = x.shape[axis]
  if n == size:
    return x
  src = np.zeros(size) if size == 1 else np.arange(size) * ((n - 1) / (size - 1))
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  frac = (src - lo).astype(np.float32)
  shape = [1] * x.ndim
  shape[axis] = size
  frac = frac.reshape(shape)
  return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """(H, W, ...) float -> (size[0], size[1], ...) with TF's align_corners=True geometry."""
  return _resize_axis(_resize_axis(np.asarray(x, np.float32), 0, int(size[0])), 1, int(size[1]))


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def grid_size(dim: int, bucket: int) -> int:
  """The smallest k * bucket + 1 >= dim (k >= 1): 16k+1-style sizes, few distinct ones."""
  return bucket * max(1, math.ceil((dim - 1) / bucket)) + 1


def workdir_config(workdir) -> ml_collections.ConfigDict:
  """The config a training run wrote beside its checkpoints (with what it took from the data)."""
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{workdir} holds no config.json: it is not a training workdir; give the "
                          f"--workdir a training run wrote")
  return ml_collections.ConfigDict(json.loads(config_path.read_text()))


# --- the predictor -----------------------------------------------------------------------------------

class Predictor:
  """A trained DeepLab on the local devices, predicting at each image's own size.

  Args:
    config: the training config (its model, classes and eval crop).
    variables: {"params", "batch_stats"}.
    output_stride: eval output stride (None: the config's eval or training one).
    scales: input scales whose probabilities are averaged, e.g. (0.5, 0.75, ..., 1.75).
    flip: also average the left-right flipped input.
    bucket: padded sizes are multiples of this plus one (a multiple of 32 keeps OS 8/16/32 exact).
    window: the sliding window (H, W); None: `config.eval.crop_size`. Larger inputs are tiled.
    overlap: fraction of the window shared by neighbouring windows; None: `config.eval.window_overlap`
      (a third), as training's evaluation tiles.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables, *, output_stride: int | None = None,
               scales: Sequence[float] = (1.0,), flip: bool = False, bucket: int = 64,
               window: Sequence[int] | None = None, overlap: float | None = None):
    if bucket < 1 or bucket % 32:
      raise ValueError(f"bucket={bucket} must be a positive multiple of 32")
    if not scales or any(s <= 0 for s in scales):
      raise ValueError(f"scales={tuple(scales)} must be positive numbers")
    if overlap is None:
      overlap = config.eval.get("window_overlap", sliding_window.DEFAULT_OVERLAP)
    if not 0 <= overlap < 1:
      raise ValueError(f"overlap={overlap} must be in [0, 1)")
    self.config = config
    self.num_classes = int(config.dataset.num_classes)
    self.output_stride = int(output_stride or config.eval.get("output_stride") or
                             config.model.output_stride)
    self.scales, self.flip = tuple(float(s) for s in scales), bool(flip)
    self.bucket, self.overlap = int(bucket), float(overlap)
    self.window = tuple(int(v) for v in (window or config.eval.crop_size))
    self.class_names = datasets.class_names(config.dataset.name, self.num_classes)
    self.palette = palette_name(config.dataset.name)  # for `overlay` and `colorize`
    self.model = create_model(config, output_stride=self.output_stride)
    device = jax.local_devices()[0]
    self.variables = jax.device_put({"params": variables["params"],
                                     "batch_stats": variables.get("batch_stats", {})}, device)
    self._apply = functools.partial(_forward, self.model)
    self.compiled_shapes: set[tuple[int, int]] = set()
    self.step: int | None = None  # the checkpoint's step, when restored from one
    self.source: str | None = None  # what it was read from

  # Construction from training output.

  @classmethod
  def from_workdir(cls, workdir, step: int | None = None, config=None, **options) -> "Predictor":
    """The run in `workdir` at its latest or a chosen step, with its config.json unless `config` is
    given (e.g. to point at another data dir)."""
    workdir = epath.Path(workdir)
    stored = workdir_config(workdir)  # also checks that it is a workdir
    config = stored if config is None else config
    manager = checkpoints.create_manager(workdir, keep=None, async_save=False, create=False)
    steps = checkpoints.steps(manager)
    if not steps:
      raise CheckpointError(f"{workdir / 'checkpoints'} holds no checkpoint; train first or give "
                            f"another --workdir")
    if step is not None and step not in steps:
      raise CheckpointError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
    variables, step = _restore_variables(manager, step, config)
    predictor = cls(config, variables, **options)
    predictor.step, predictor.source = step, str(workdir)
    return predictor

  @classmethod
  def from_pretrained(cls, path, *, dataset: str | None = None, config=None, **options) -> "Predictor":
    """A trained DeepLab from its weights alone: a folder written by `weights convert`, an official
    checkpoint prefix (DIR/model.ckpt), an extracted model-zoo folder or the zoo's .tar.gz, local or
    gs://. The network comes from the weights; class names, palette and eval crop from the class
    count (21 VOC, 19 Cityscapes, 151 ADE20K), or `dataset`; `config` (optional) gives the data set
    and eval fields instead. The zoo's figures need its eval options, e.g. for VOC models
    `output_stride=8, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True`."""
    from deeplab_jax.weights import pretrained
    config, variables, info = pretrained.load(path, dataset=dataset, config=config)
    predictor = cls(config, variables, **options)
    predictor.source = str(path)
    logging.info("weights from %s: %s", path, {k: v for k, v in info.items() if k != "report"})
    return predictor

  @classmethod
  def from_checkpoint(cls, path, config: ml_collections.ConfigDict, **options) -> "Predictor":
    """A checkpoint directory `<workdir>/checkpoints/<step>` restored into `config`'s model."""
    path = epath.Path(path)
    if not path.name.isdigit() or not path.exists():
      raise CheckpointError(f"{path} is not a checkpoint directory; give <workdir>/checkpoints/<step>")
    manager = checkpoints.create_manager(path.parent.parent, keep=None, async_save=False, create=False)
    variables, step = _restore_variables(manager, int(path.name), config)
    predictor = cls(config, variables, **options)
    predictor.step = step
    return predictor

  # Prediction.

  def predict_proba(self, images):
    """Class probabilities (H, W, num_classes) float32 per image; a list or 4-D batch gives a list."""
    if _is_batch(images):
      return [self._probabilities(load_image(image)) for image in images]
    return self._probabilities(load_image(images))

  def predict(self, images):
    """Class ids (H, W) uint8 (int32 beyond 256 classes) per image; a list or batch gives a list."""
    dtype = np.uint8 if self.num_classes <= 256 else np.int32
    if _is_batch(images):
      return [p.argmax(-1).astype(dtype) for p in self.predict_proba(images)]
    return self.predict_proba(images).argmax(-1).astype(dtype)

  def _probabilities(self, image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    image = image.astype(np.float32)
    total = np.zeros((height, width, self.num_classes), np.float32)
    for scale in self.scales:
      scaled = image if scale == 1 else resize_bilinear(
          image, (scale_dimension(height, scale), scale_dimension(width, scale)))
      for flipped in ((False, True) if self.flip else (False,)):
        logits = self.logits(scaled[:, ::-1] if flipped else scaled)
        if flipped:
          logits = logits[:, ::-1]
        if scale != 1:
          logits = resize_bilinear(logits, (height, width))
        total += _softmax(logits)
    return total / (len(self.scales) * (2 if self.flip else 1))

  def logits(self, image: np.ndarray) -> np.ndarray:
    """One pass: (H, W, 3) float in [0, 255] -> logits (H, W, C), tiled when larger than the window."""
    height, width = image.shape[:2]
    win_h = min(self.window[0], grid_size(height, self.bucket))
    win_w = min(self.window[1], grid_size(width, self.bucket))
    if height <= win_h and width <= win_w:
      return self._run(image, (grid_size(height, self.bucket), grid_size(width, self.bucket)))
    average = sliding_window.Average(height, width, self.num_classes)
    step = sliding_window.stride((win_h, win_w), self.overlap)
    for top, left, h, w in sliding_window.tiles(height, width, (win_h, win_w), step):
      average.add(top, left, self._run(image[top:top + h, left:left + w], (win_h, win_w)))
    return average.result()

  def _run(self, image: np.ndarray, padded: tuple[int, int]) -> np.ndarray:
    """The network on `image` padded bottom/right to `padded`; logits cropped back to the image."""
    height, width = image.shape[:2]
    x = np.full((1, *padded, 3), PAD_VALUE, np.float32)
    x[0, :height, :width] = image
    self.compiled_shapes.add(tuple(padded))
    return np.asarray(self._apply(self.variables, jnp.asarray(x)))[0, :height, :width]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, x):
  """Logits at the input's size. Module-level, keyed by the (hashable) model, so predictors of the same
  model share compiled programs."""
  return upsample_logits(model.apply(variables, x, train=False), x.shape[1:3])


def _is_batch(images) -> bool:
  if isinstance(images, (list, tuple)):
    return True
  return isinstance(images, np.ndarray) and images.ndim == 4


def _restore_variables(manager, step: int | None, config) -> tuple[dict, int]:
  """(params and BN statistics, step) of the TrainState at `step` (None: the newest intact one), on
  one local device, whatever mesh wrote it. A damaged checkpoint is never moved here: readers leave
  the workdir as it is."""
  from deeplab_jax import train  # the state's structure; imported here to keep `infer` light to load
  abstract = train.abstract_state(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  if step is None:
    restored = checkpoints.restore_newest(manager, target)
    state, step = restored.state, restored.step
  else:
    state = checkpoints.restore(manager, step, target)
  return {"params": state.params, "batch_stats": state.batch_stats}, int(step)


# --- colors ----------------------------------------------------------------------------------------

def palette_colors(name: str = "voc") -> np.ndarray:
  """(256, 3) uint8 colors: "voc"; "cityscapes" (the benchmark's 19 colors); "ade20k" and the shapes
  data use the VOC bit-pattern palette, which gives all 256 ids distinct colors."""
  if name in ("voc", "ade20k", "synthetic_shapes"):
    return visualize.voc_palette()
  if name == "cityscapes":
    colors = np.zeros((256, 3), np.uint8)
    colors[:19] = CITYSCAPES_COLORS
    return colors
  raise ValueError(f"palette {name!r} is not known; use 'voc', 'cityscapes' or 'ade20k'")


CITYSCAPES_COLORS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    np.uint8)


def colorize(labels, palette: str | np.ndarray = "voc") -> np.ndarray:
  """Class ids (H, W) -> colors (H, W, 3) uint8."""
  colors = palette_colors(palette) if isinstance(palette, str) else np.asarray(palette, np.uint8)
  return visualize.colorize(labels, colors)


def overlay(image, labels, alpha: float = 0.5, palette: str | np.ndarray = "voc") -> np.ndarray:
  """The image with its colorized labels blended in (alpha = label weight), uint8 (H, W, 3)."""
  image = load_image(image).astype(np.float32)
  colors = colorize(labels, palette).astype(np.float32)
  if colors.shape != image.shape:
    raise ValueError(f"labels {np.shape(labels)} do not match the image {image.shape[:2]}")
  return np.clip(image * (1 - alpha) + colors * alpha, 0, 255).astype(np.uint8)


def image_files(path) -> Iterable[epath.Path]:
  """An image file, or the image files of a folder in sorted order."""
  path = epath.Path(path)
  if path.is_dir():
    return sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp",
                                                                     ".gif", ".webp", ".tif", ".tiff"))
  return [path]


# --- command line ----------------------------------------------------------------------------------

def define_source_flags():
  """--workdir or --weights (and --step): where the infer, evaluate and export commands read a model."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("weights", None, "Pretrained weights instead of a workdir: a folder written by "
                      "weights convert, a TF checkpoint prefix (DIR/model.ckpt), a model-zoo folder or "
                      "its .tar.gz; local or gs://.")
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")


def check_source_flags(flag_values) -> None:
  """One of --workdir and --weights; --step only with --workdir (absl's UsageError: one line)."""
  from absl import app
  if bool(flag_values.workdir) == bool(flag_values.weights):
    raise app.UsageError("give --workdir (a training run) or --weights (pretrained weights), "
                         + ("not both" if flag_values.workdir else "one of them"))
  if flag_values.weights and flag_values.step is not None:
    raise app.UsageError("--step picks a checkpoint of --workdir; --weights has one set of weights")


def predictor_from_flags(flag_values, config=None, **options) -> "Predictor":
  if flag_values.weights:
    return Predictor.from_pretrained(flag_values.weights, config=config, **options)
  return Predictor.from_workdir(flag_values.workdir, flag_values.step, config=config, **options)


def define_strategy_flags():
  """--scales, --flip, --output_stride: shared by the infer and evaluate commands."""
  from absl import flags
  flags.DEFINE_list("scales", ["1.0"], "Input scales to average (VOC: 0.5,0.75,1.0,1.25,1.5,1.75).")
  flags.DEFINE_bool("flip", False, "Also average the left-right flipped input.")
  flags.DEFINE_integer("output_stride", None, "Eval output stride (8, 16, 32; default: the config's).")


def strategy_options(flag_values) -> dict:
  """Predictor options from the strategy flags."""
  return dict(output_stride=flag_values.output_stride, flip=flag_values.flip,
              scales=[float(s) for s in flag_values.scales])


def _define_flags():
  from absl import flags
  define_source_flags()
  flags.DEFINE_string("input", None, "An image file or a folder of images.")
  flags.DEFINE_string("output", None, "Folder for <name>.png label maps and <name>_overlay.jpg.")
  flags.DEFINE_float("alpha", 0.5, "Label weight in the overlays.")
  define_strategy_flags()
  flags.mark_flags_as_required(["input", "output"])


def palette_name(dataset_name: str) -> str:
  return "cityscapes" if datasets.base_name(dataset_name) == "cityscapes" else "voc"


def save_label_png(labels: np.ndarray, path: epath.Path, colors: np.ndarray) -> None:
  """A palette PNG: pixel values are the class ids, viewers show the palette's colors."""
  labels = np.ascontiguousarray(labels, np.uint8)
  image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
  image.putpalette(colors.reshape(-1).tolist())
  with path.open("wb") as f:
    image.save(f, format="PNG")


def segment_folder(predictor: Predictor, inputs, output, alpha: float = 0.5) -> tuple[int, list[str]]:
  """Label PNGs and overlay JPEGs for every input image; returns (written, skipped-with-reasons)."""
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  console.open_log(output, "infer.log")
  colors = palette_colors(palette_name(predictor.config.dataset.name))
  written, skipped = 0, []
  inputs = list(inputs)
  for path in console.bar(inputs, len(inputs), "segmenting", "image"):
    try:
      image = load_image(path)
    except DataError as e:
      skipped.append(str(e))
      logging.info("skipped: %s", e)
      continue
    started = time.time()
    labels = predictor.predict(image)
    logging.info("%s: %dx%d in %.2f s", path, image.shape[0], image.shape[1], time.time() - started)
    save_label_png(labels, output / f"{path.stem}.png", colors)
    with (output / f"{path.stem}_overlay.jpg").open("wb") as f:
      Image.fromarray(overlay(image, labels, alpha, colors)).save(f, format="JPEG", quality=90)
    written += 1
  return written, skipped


def _segment_command(flag_values) -> tuple[Predictor, int, list[str]]:
  # The inputs first: a wrong path fails in a second, not after the checkpoint is read.
  if not epath.Path(flag_values.input).exists():
    raise DataError(f"--input={flag_values.input} does not exist; give an image file or a folder of "
                    f"images")
  inputs = image_files(flag_values.input)
  if not inputs:
    raise DataError(f"--input={flag_values.input} holds no .jpg/.png/... images")
  predictor = predictor_from_flags(flag_values, **strategy_options(flag_values))
  return (predictor, *segment_folder(predictor, inputs, flag_values.output, flag_values.alpha))


def main(argv):
  import sys
  from absl import flags
  from deeplab_jax import runtime
  del argv
  FLAGS = flags.FLAGS
  check_source_flags(FLAGS)

  def run():
    console.setup(FLAGS.verbosity)  # details to OUTPUT/infer.log; --verbosity=1 shows them live
    return _segment_command(FLAGS)

  predictor, written, skipped = runtime.run_command(run)
  for reason in skipped:
    print(f"deeplab_jax: skipped: {reason}", file=sys.stderr)
  shapes = sorted(predictor.compiled_shapes)
  print(f"deeplab_jax: segmented {written} images into {FLAGS.output}; {len(shapes)} compiled "
        f"program(s) for padded sizes {shapes}" + (f"; skipped {len(skipped)}" if skipped else ""))
  if skipped:
    sys.exit(DataError.exit_code)


if __name__ == "__main__":
  from deeplab_jax import runtime
  _define_flags()
  runtime.run_app(main)
