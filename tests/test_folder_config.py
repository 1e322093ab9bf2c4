"""Your own folder of images, as a user runs it (issue 31): prepare, then configs/folder.py with
nothing the data could set, then `evaluate --workdir` alone. The data's class count, ignore label,
splits and largest image size come from what `prepare` stored; a validation image larger than the
config's 513 eval crop is evaluated through the sliding window."""
import json

import pytest
from PIL import Image

import fake_data
from conftest import run_module

SHAPE = (40, 50)  # the fake images, but for the first val image:
LARGE = (520, 530)  # larger than folder.py's 513 eval crop: 2x2 windows of 513


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("own")
  fake_data.make_folder(root / "manual", {"train": 6, "val": 3}, shape=SHAPE, num_classes=3,
                        sizes={6: LARGE})
  (root / "manual" / "classes.txt").write_text("sky\nroad\ncar\n")
  result = run_module(["deeplab_jax.datasets.prepare", "folder_segmentation",
                       f"--manual_dir={root / 'manual'}", f"--data_dir={root / 'tfds'}", "--num_classes=3"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert (result.stdout + result.stderr).strip().splitlines() == [
      f"deeplab_jax: prepared folder_segmentation in {root / 'tfds'}: train 6, val 3"]
  version = root / "tfds" / "folder_segmentation" / "1.0.0"
  assert json.loads((version / "metadata.json").read_text())["largest_image"] == {
      "train": list(SHAPE), "val": list(LARGE)}
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
  assert ("evaluation: val images up to 520x530; those larger than the 513x513 eval crop go through a "
          "sliding window of that size, stride 342x342") in train.stderr
  config = json.loads((workdir / "config.json").read_text())["dataset"]
  assert (config["num_classes"], config["ignore_label"], config["train_split"], config["eval_split"]) == (
      3, 255, "train", "val")
  final = json.loads((workdir / "final_metrics.json").read_text())
  with Image.open(workdir / "examples.png") as examples:  # the 520x530 photo's panel, shrunk to 513
    assert examples.size[0] == 3 * 513
  assert list(final["per_class_iou"]) == ["sky", "road", "car"]

  evaluate = run_module(["deeplab_jax.evaluate", f"--workdir={workdir}"])
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  (written,) = (workdir / "eval").glob("4_val_os16_scales1.json")
  results = json.loads(written.read_text())
  assert results["images"] == 3 and results["class_names"] == ["sky", "road", "car"]
  # The large image goes through the same four 513 windows in both. Training pads the two small
  # ones to the 513 eval crop, evaluate to 65x65 (64k+1): the image-pooling branch averages over the
  # padded extent, so their logits differ a little (tests/test_sliding_window.py: equal confusion
  # matrices where the windows and padding are the same).
  assert abs(results["mean_iou"] - final["mean_iou"]) < 0.05, (results["mean_iou"], final["mean_iou"])


@pytest.mark.reliability
def test_a_value_the_data_contradicts_stops_before_training(folder_data, tmp_path):
  result = run_module(["deeplab_jax.main", "--config=configs/folder.py",
                       f"--config.dataset.data_dir={folder_data}", f"--workdir={tmp_path / 'w'}",
                       "--config.dataset.num_classes=4"])
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "deeplab_jax: error: config.dataset.num_classes=4 but folder_segmentation/1.0.0 has 3 classes; "
      "set it to 3")
  assert not (tmp_path / "w").exists()
