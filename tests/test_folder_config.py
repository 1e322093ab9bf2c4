"""Your own folder of images, as a user runs it (issue 31): prepare, then configs/folder.py with
nothing the data could set, then `evaluate --workdir` alone. The data's class count, ignore label,
splits and largest image size come from what `prepare` stored."""
import json

import pytest

import fake_data
from conftest import run_module

SHAPE = (40, 50)  # the fake images; the eval crop check uses a smaller crop


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("own")
  fake_data.make_folder(root / "manual", {"train": 6, "val": 3}, shape=SHAPE, num_classes=3)
  (root / "manual" / "classes.txt").write_text("sky\nroad\ncar\n")
  result = run_module(["deeplab_jax.datasets.prepare", "folder_segmentation",
                       f"--manual_dir={root / 'manual'}", f"--data_dir={root / 'tfds'}", "--num_classes=3"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert (result.stdout + result.stderr).strip().splitlines() == [
      f"deeplab_jax: prepared folder_segmentation in {root / 'tfds'}: train 6, val 3"]
  version = root / "tfds" / "folder_segmentation" / "1.0.0"
  assert json.loads((version / "metadata.json").read_text())["largest_image"] == {
      "train": list(SHAPE), "val": list(SHAPE)}
  assert (version / "prepare.log").exists()
  return root / "tfds"


def test_the_folder_config_trains_and_evaluates_with_what_the_data_stores(folder_data, tmp_path):
  workdir = tmp_path / "w"
  # Only the run's length: 4 steps, so the warm-up must be shorter too (a one-line refusal otherwise).
  train = run_module(["deeplab_jax.main", "--config=configs/folder.py",
                      f"--config.dataset.data_dir={folder_data}", f"--workdir={workdir}",
                      "--config.train.steps=4", "--config.optim.warmup_steps=0"])
  assert train.returncode == 0, train.stderr[-3000:]
  assert "3 classes; folder_segmentation: 6 training images" in train.stderr
  config = json.loads((workdir / "config.json").read_text())["dataset"]
  assert (config["num_classes"], config["ignore_label"], config["train_split"], config["eval_split"]) == (
      3, 255, "train", "val")
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert list(final["per_class_iou"]) == ["sky", "road", "car"]

  evaluate = run_module(["deeplab_jax.evaluate", f"--workdir={workdir}"])
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  (written,) = (workdir / "eval").glob("4_val_os16_scales1.json")
  results = json.loads(written.read_text())
  assert results["images"] == 3 and results["class_names"] == ["sky", "road", "car"]
  # Training pads each batch to the 513 eval crop, evaluate each image to 65x65 (64k+1): the
  # image-pooling branch averages over the padded extent, so the logits differ a little.
  assert abs(results["mean_iou"] - final["mean_iou"]) < 0.05, (results["mean_iou"], final["mean_iou"])


@pytest.mark.reliability
def test_a_value_the_data_contradicts_or_an_eval_crop_below_its_largest_image_stops_before_training(
    folder_data, tmp_path):
  base = ["deeplab_jax.main", "--config=configs/folder.py", f"--config.dataset.data_dir={folder_data}",
          f"--workdir={tmp_path / 'w'}"]
  for flag, message in (
      ("--config.dataset.num_classes=4", "config.dataset.num_classes=4 but folder_segmentation/1.0.0 "
                                         "has 3 classes; set it to 3"),
      ("--config.eval.crop_size=(33, 49)", "the largest val image of folder_segmentation/1.0.0 is 40x50, "
                                           "larger than config.eval.crop_size=(33, 49); set "
                                           "--config.eval.crop_size=\"(40, 50)\"")):
    result = run_module(base + [flag])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"deeplab_jax: error: {message}"
    assert not (tmp_path / "w").exists()
