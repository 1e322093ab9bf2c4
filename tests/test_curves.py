"""The learning-curve plot: values read back from TensorBoard events, a resumed run's repeated steps
keeping their last value."""
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from deeplab_jax import curves


def _write(path, step_values):
  writer = tf.summary.create_file_writer(str(path))
  with writer.as_default():
    for tag, step, value in step_values:
      tf.summary.scalar(tag, value, step=step)
  writer.close()


def test_repeated_steps_keep_the_last_write_and_the_plot_shows_both_curves(tmp_path):
  # A run interrupted after step 30 (its step-30 loss logged) and resumed from step 20: the restart
  # logs 30 again; its value must win. Another tag is ignored.
  _write(tmp_path / "a", [("train/loss", 10, 2.0), ("train/loss", 20, 1.5), ("train/loss", 30, 9.0),
                          ("eval/mean_iou", 20, 0.4), ("train/grad_norm", 20, 5.0)])
  _write(tmp_path / "b", [("train/loss", 30, 1.0), ("eval/mean_iou", 30, 0.6)])
  for sub in ("a", "b"):  # one workdir, event files named in time order
    for f in (tmp_path / sub).iterdir():
      f.rename(tmp_path / f.name.replace("tfevents.", f"tfevents.{sub}"))
  scalars = curves.read_scalars(tmp_path)
  assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30]
  assert [v for _, v in scalars["train/loss"]] == pytest.approx([2.0, 1.5, 1.0])
  assert scalars["eval/mean_iou"] == [(20, pytest.approx(0.4)), (30, pytest.approx(0.6))]
  path = curves.write(tmp_path, 40)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (300, 840, 3)
  # Both curves are drawn: the loss panel holds the loss color, the IoU panel the IoU color.
  for panel, color in ((image[:, :420], curves._COLORS[0]), (image[:, 420:], curves._COLORS[1])):
    assert (np.abs(panel.astype(int) - color).sum(-1) == 0).sum() > 50
