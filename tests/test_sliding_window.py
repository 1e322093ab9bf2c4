"""Images larger than the eval crop (issue 31): the sliding window's layout, and training's evaluation
of such images against whole-image evaluation and against `evaluate` (the Predictor)."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables, tiny_config

from deeplab_jax import evaluate, infer, input_pipeline, sharding, sliding_window, train
from deeplab_jax.models import create_model


def _mmsegmentation_slide(dim: int, crop: int, stride: int) -> list[int]:
  """The window offsets of mmsegmentation's slide_inference, as its formula gives them."""
  grids = max(dim - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, dim) - crop, 0) for i in range(grids)]


def test_windows_are_mmsegmentations_slide_and_cover_every_pixel():
  assert sliding_window.stride((512, 513), 1 / 3) == (341, 342)  # slide mode's usual 512 / 341
  assert sliding_window.stride((65, 65), 0) == (65, 65)
  for dim in (1, 64, 65, 66, 100, 129, 130, 511, 512, 513, 1024, 2048, 2049):
    for crop, stride in ((65, 43), (129, 86), (513, 342), (512, 341), (65, 65), (65, 1)):
      starts = sliding_window.starts(dim, crop, stride)
      assert starts == _mmsegmentation_slide(dim, crop, stride), (dim, crop, stride)
  tiles = sliding_window.tiles(100, 40, (65, 65), (43, 43))
  assert tiles == [(0, 0, 65, 40), (35, 0, 65, 40)]  # narrower than the window: one tile across
  covered = np.zeros((100, 40), int)
  for top, left, h, w in tiles:
    covered[top:top + h, left:left + w] += 1
  assert covered.min() == 1 and covered.max() == 2
  average = sliding_window.Average(100, 40, 2)
  for top, left, h, w in tiles:
    average.add(top, left, np.full((h, w, 2), float(top)))
  result = average.result()
  assert result[0, 0, 0] == 0 and result[99, 0, 0] == 35 and result[50, 0, 0] == 17.5


@pytest.fixture(scope="module")
def network(tiny_data_dir):
  """The tiny config's network with He-scaled random weights, as a train state on this device. Its
  predictions vary over the image (5 of the 6 classes), and sliding windows of 65 change a third of
  its pixels against whole images, so agreements below are not those of a constant. (The 30-step
  trained run of conftest predicts one class nearly everywhere.)"""
  config = tiny_config(tiny_data_dir)
  variables = random_variables(create_model(config), (1, 65, 65, 3))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state=None)
  return config, variables, train.abstract_state(config), state


def _training_evaluation(config, abstract, state):
  mesh = sharding.create_mesh()
  builder = input_pipeline.load_builder(config)
  return train.Evaluator(config, builder, mesh, sharding.state_shardings(abstract, mesh))(state)


def test_a_window_that_covers_the_image_gives_whole_image_evaluation(network, monkeypatch):
  """The 12 val images (112-128 px) fit the 129 crop. Sent through the window path instead (host
  averaging of one window each, host argmax and counting), they give exactly the on-device result."""
  config, _, abstract, state = network
  config = config.copy_and_resolve_references()
  config.eval.crop_size = (129, 129)
  whole, whole_images = _training_evaluation(config, abstract, state)
  monkeypatch.setattr(input_pipeline, "runs_whole", lambda shape, crop: False)
  windowed, windowed_images = _training_evaluation(config, abstract, state)
  np.testing.assert_array_equal(windowed["confusion_matrix"], whole["confusion_matrix"])
  assert len(whole_images) == len(windowed_images) == 4
  for a, b in zip(whole_images, windowed_images):
    np.testing.assert_array_equal(a, b)


def test_images_larger_than_the_crop_slide_as_the_predictor_does(network, tiny_data_dir):
  """With a 65 crop every val image (112-128 px) is cut into 9 windows of 65 (stride 43), batched 8
  at a time; training's evaluation then equals `evaluate`'s, whose Predictor tiles each image the same
  way one window at a time. Both count each labelled pixel once."""
  config, variables, abstract, state = network
  config = config.copy_and_resolve_references()
  config.eval.crop_size = (65, 65)
  results, images = _training_evaluation(config, abstract, state)
  reference = evaluate.evaluate(config, predictor=infer.Predictor(config, variables))
  assert reference["images"] == 12
  got, want = results["confusion_matrix"], reference["confusion_matrix"]
  assert got.sum() == want.sum() > 12 * 100 * 100 // 2
  # Float32 rounding of a batch of 8 against batches of 1 may flip a pixel whose two best logits tie.
  assert np.abs(got - want).sum() <= 1e-4 * want.sum(), np.abs(got - want).sum()
  assert results["mean_iou"] == pytest.approx(reference["mean_iou"], abs=1e-4)
  # Summaries show the first images whole (not a window), shrunk to the crop: longest side 65.
  builder = input_pipeline.load_builder(config)
  sizes = [e["label"].shape for e in input_pipeline.as_numpy(
      input_pipeline.eval_examples(builder, config).take(4))]
  assert [im.shape for im in images] == [
      (round(h * 65 / max(h, w)), 3 * round(w * 65 / max(h, w)), 3) for h, w in sizes]
  whole = evaluate.evaluate(config, predictor=infer.Predictor(config, variables, window=(129, 129)))
  assert np.abs(whole["confusion_matrix"] - want).sum() > 0.1 * want.sum()  # the windows did slide
