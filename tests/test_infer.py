"""Inference: any input size, padding and crop-back, multi-scale + flip averaging, sliding windows,
restoring an 8-device checkpoint on one device, and clear errors for bad input."""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from conftest import REPO, random_variables, tiny_config
from deeplab_jax import infer
from deeplab_jax.errors import CheckpointError, DataError
from deeplab_jax.models import create_model


@pytest.fixture(scope="module")
def tiny():
  """The tests' shapes config (MobileNetV2 0.5, 6 classes, eval crop 129) with random variables."""
  config = tiny_config("/nonexistent")
  return config, random_variables(create_model(config), (1, 65, 65, 3))


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def _pointwise(x):
  """A stand-in network whose logits depend on each pixel alone (no receptive field, no pooling)."""
  weights = jnp.asarray(np.linspace(-1, 1, 18).reshape(3, 6), jnp.float32)
  return jnp.tanh((x / 255.0) @ weights * 3)


def test_predictions_come_back_at_the_input_size_for_any_input(tiny):
  config, variables = tiny
  predictor = infer.Predictor(config, variables)
  for height, width in ((33, 33), (40, 57), (64, 70), (7, 5)):
    labels = predictor.predict(_image(height, width))
    assert labels.shape == (height, width) and labels.dtype == np.uint8 and labels.max() < 6
  # Grayscale and RGBA are converted, not refused; lists and 4-D batches give lists.
  gray = _image(40, 57)[..., 0]
  np.testing.assert_array_equal(predictor.predict(gray), predictor.predict(np.stack([gray] * 3, -1)))
  rgba = np.concatenate([_image(40, 57), np.full((40, 57, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(predictor.predict(rgba), predictor.predict(_image(40, 57)))
  batch = predictor.predict(np.stack([_image(40, 57, 1), _image(40, 57, 2)]))
  assert [b.shape for b in batch] == [(40, 57)] * 2
  # Sizes round up to 64k + 1: four sizes (and the batch) compiled two programs, 65x65 and 65x129.
  assert predictor.compiled_shapes == {(65, 65), (65, 129)}


def test_padding_is_cropped_back_exactly(tiny):
  """The returned probabilities are the network's on the padded input, cropped to the image: no shift,
  no resampling. (Which bucket an image is padded to can still change predictions slightly, as in the
  official evaluation: the ASPP image-pooling branch averages over the padding too.)"""
  config, variables = tiny
  predictor = infer.Predictor(config, variables)
  image = _image(40, 57)
  padded = np.full((1, 65, 65, 3), 127.5, np.float32)  # 40x57 rounds up to 64k + 1 = 65x65
  padded[0, :40, :57] = image
  reference = np.asarray(predictor._apply(predictor.variables, jnp.asarray(padded)))[0, :40, :57]
  np.testing.assert_allclose(predictor.predict_proba(image), tf.nn.softmax(reference).numpy(),
                             atol=1e-6)
  # A pixelwise network sees no padding at all: the prediction is the same in any bucket.
  small, large = infer.Predictor(config, variables, bucket=32), infer.Predictor(config, variables,
                                                                                bucket=128)
  small._apply = large._apply = lambda v, x: _pointwise(x)
  np.testing.assert_allclose(small.predict_proba(image), large.predict_proba(image), atol=1e-6)


def _tf_resize(x, size):
  return tf.compat.v1.image.resize_bilinear(x[None], size, align_corners=True)[0].numpy()


def test_multiscale_and_flip_equal_the_average_of_the_single_passes(tiny):
  config, variables = tiny
  image = _image(37, 40)  # every scaled size pads to 65x65: one program
  scales = (0.5, 1.0, 1.5)
  combined = infer.Predictor(config, variables, scales=scales, flip=True).predict_proba(image)
  single = infer.Predictor(config, variables)
  expected = []
  for scale in scales:
    size = (int(36 * scale + 1), int(39 * scale + 1))  # the official scale_dimension
    scaled = _tf_resize(image.astype(np.float32), size)
    for flipped in (False, True):
      logits = single.logits(scaled[:, ::-1] if flipped else scaled)
      logits = logits[:, ::-1] if flipped else logits
      expected.append(tf.nn.softmax(_tf_resize(np.ascontiguousarray(logits), (37, 40))).numpy())
  # TF's resize and the predictor's NumPy one round differently in float32 (about 1e-6 of a pixel
  # value), which the random network amplifies to at most 2e-5 in a probability.
  np.testing.assert_allclose(combined, np.mean(expected, axis=0), atol=1e-4)
  assert combined.shape == (37, 40, 6)
  np.testing.assert_allclose(combined.sum(-1), 1, atol=1e-5)


def test_sliding_window_equals_the_whole_image_where_the_receptive_field_allows(tiny):
  config, variables = tiny
  image = _image(150, 170)
  # Exact where the network's receptive field is one pixel: the tiling adds nothing.
  tiled, whole = infer.Predictor(config, variables, window=(65, 65)), infer.Predictor(
      config, variables, window=(257, 257))
  tiled._apply = whole._apply = lambda v, x: _pointwise(x)
  np.testing.assert_allclose(tiled.predict_proba(image), whole.predict_proba(image), atol=1e-6)
  assert tiled.compiled_shapes == {(65, 65)} and whole.compiled_shapes == {(193, 193)}
  # The real network sees the whole image only through ASPP image pooling (each window pools its own
  # area) and its border context: with 129 windows sharing a third, random weights (far more
  # sensitive than trained ones) still agree on most pixels. Measured: 93% agreement, mean
  # probability difference 0.046.
  tiled, whole = (infer.Predictor(config, variables, window=(129, 129)),
                  infer.Predictor(config, variables, window=(257, 257)))
  a, b = tiled.predict_proba(image), whole.predict_proba(image)
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.85
  assert np.abs(a - b).mean() < 0.08


@pytest.fixture(scope="module")
def eight_device_workdir(step_facts):
  """The workdir conftest's 8-device process saved: fsdp-sharded state after 2 steps, config.json."""
  return step_facts["workdir"], step_facts["saved"]


def _workdir_config(workdir):
  import ml_collections
  return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def test_a_checkpoint_saved_on_8_devices_restores_on_1(eight_device_workdir):
  import jax
  workdir, saved = eight_device_workdir
  assert saved["sharded_params"] > 0  # it really was split over the 8 devices
  assert jax.device_count() == 1
  predictor = infer.Predictor.from_workdir(workdir)
  expected = np.load(workdir / "expected.npz")
  restored = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
      {"params": predictor.variables["params"], "bn": predictor.variables["batch_stats"]})}
  assert sorted(restored) == sorted(expected.files)
  for key in expected.files:
    np.testing.assert_array_equal(restored[key], expected[key])
  assert predictor.predict(_image(20, 30)).shape == (20, 30)
  # The same checkpoint by path, with the config given.
  again = infer.Predictor.from_checkpoint(workdir / "checkpoints" / "2", predictor.config)
  np.testing.assert_array_equal(again.predict(_image(20, 30)), predictor.predict(_image(20, 30)))


def test_bad_input_gets_one_line_errors(eight_device_workdir, tmp_path):
  workdir, _ = eight_device_workdir
  with pytest.raises(CheckpointError, match=r"holds no config.json: it is not a training workdir"):
    infer.Predictor.from_workdir(tmp_path / "missing")
  with pytest.raises(CheckpointError, match=r"has no checkpoint at step 3; it has \[2\]"):
    infer.Predictor.from_workdir(workdir, step=3)
  config = _workdir_config(workdir)
  config.dataset.num_classes = 21  # a different logits layer than the checkpoint's
  with pytest.raises(CheckpointError, match=r"has params/logits/semantic/bias of shape \(6,\) but this "
                                             r"config's model needs \(21,\); use the config"):
    infer.Predictor.from_checkpoint(workdir / "checkpoints" / "2", config)
  text = tmp_path / "notes.txt"
  text.write_text("not an image")
  predictor = infer.Predictor.from_workdir(workdir)
  with pytest.raises(DataError, match=r"notes.txt is not an image PIL can read"):
    predictor.predict(str(text))
  png = tmp_path / "gray.png"
  Image.fromarray(_image(20, 30)[..., 0]).save(png)  # grayscale file: converted
  assert predictor.predict(str(png)).shape == (20, 30)


def test_colorize_and_overlay():
  labels = np.array([[0, 1], [2, 255]], np.uint8)
  voc = infer.colorize(labels, "voc")
  assert voc.shape == (2, 2, 3) and tuple(voc[0, 1]) == (128, 0, 0) and tuple(voc[1, 0]) == (0, 128, 0)
  assert tuple(infer.colorize(labels, "cityscapes")[0, 0]) == (128, 64, 128)  # road
  image = np.full((2, 2, 3), 100, np.uint8)
  blended = infer.overlay(image, labels, alpha=0.5, palette="voc")
  np.testing.assert_array_equal(blended[0, 1], [114, 50, 50])
  with pytest.raises(ValueError, match="palette 'nope' is not known"):
    infer.colorize(labels, "nope")


def test_evaluate_at_a_single_scale_matches_the_training_evaluation(eight_device_workdir):
  """The same checkpoint through `evaluate` (whole images, predictor buckets of 64k+1) and through the
  training Evaluator (batches padded to the 129 eval crop): the 112-128 px val images pad to 129 either
  way, so the confusion matrices agree; then a flip strategy writes its own result file."""
  from deeplab_jax import checkpoints, evaluate, input_pipeline, sharding, train
  workdir, saved = eight_device_workdir
  config = _workdir_config(workdir)  # the tiny shapes data, 12 val images
  results = evaluate.evaluate(config, workdir)
  mesh = sharding.create_mesh()
  abstract = train.abstract_state(config)
  shardings = sharding.state_shardings(abstract, mesh)
  manager = checkpoints.create_manager(workdir, keep=None, async_save=False, create=False)
  state = checkpoints.restore(manager, saved["step"], sharding.with_shardings(abstract, shardings))
  builder = input_pipeline.load_builder(config)
  reference, _ = train.Evaluator(config, builder, mesh, shardings)(state)
  assert results["images"] == 12 and results["step"] == saved["step"]
  np.testing.assert_array_equal(results["confusion_matrix"], reference["confusion_matrix"])
  assert results["mean_iou"] == pytest.approx(reference["mean_iou"])
  path = evaluate.write_results(workdir, evaluate.evaluate(config, workdir, flip=True), "val")
  assert path.name == "2_val_os16_scales1_flip.json"
  saved = json.loads(path.read_text())
  assert np.asarray(saved["confusion_matrix"]).sum() == reference["confusion_matrix"].sum()


def test_cli_segments_a_folder_of_mixed_sizes_with_few_compilations(eight_device_workdir, tmp_path):
  from deeplab_jax.datasets import shapes
  workdir, _ = eight_device_workdir
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  sizes = [(100, 130), (128, 128), (90, 117), (60, 80), (129, 129), (115, 121), (50, 64), (70, 100)]
  for k, (h, w) in enumerate(sizes):
    image, _ = shapes.generate_example(rng, h, w)
    Image.fromarray(image).save(images / (f"{k}.jpg" if k % 2 else f"{k}.png"))
  Image.fromarray(image[..., 0]).save(images / "gray.png")
  Image.fromarray(np.concatenate([image, np.full((70, 100, 1), 99, np.uint8)], -1)).save(
      images / "rgba.png")
  (images / "broken.jpg").write_text("not an image")
  result = subprocess.run([sys.executable, "-m", "deeplab_jax.infer", f"--workdir={workdir}",
                           f"--input={images}", f"--output={tmp_path / 'out'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == DataError.exit_code  # all written, one file skipped and named
  assert "deeplab_jax: skipped: " in result.stderr and "broken.jpg is not an image" in result.stderr
  last = result.stdout.strip().splitlines()[-1]
  # 10 images of 8 sizes: the padded sizes 65x65, 65x129, 129x129 -> at most 3 programs.
  assert last.startswith(f"deeplab_jax: segmented 10 images into {tmp_path / 'out'}; ")
  programs = int(last.split("; ")[1].split()[0])
  assert 1 <= programs <= 3
  for k, (h, w) in enumerate(sizes):
    mask = Image.open(tmp_path / "out" / f"{k}.png")
    assert mask.mode == "P" and mask.size == (w, h) and np.asarray(mask).max() < 6
    assert Image.open(tmp_path / "out" / f"{k}_overlay.jpg").size == (w, h)
  assert Image.open(tmp_path / "out" / "rgba.png").size == (100, 70)
