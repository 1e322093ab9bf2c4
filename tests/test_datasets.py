"""Builders on fake downloads in the real layouts: split sizes, which image and mask each example got,
label values and id mappings; the prepare command's messages."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_data
from conftest import run_module, tiny_config
from deeplab_jax import datasets, input_pipeline
from deeplab_jax.datasets import ade20k, cityscapes
from deeplab_jax.errors import ConfigError, DataError


def _examples(builder, split):
  """{file_name: (image uint8, label uint8 (H, W))} of a split, decoded by TFDS."""
  out = {}
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    out[example["file_name"].decode()] = (example["image"], example["segmentation"][..., 0])
  return out


def _image_number(image) -> int:
  """Which fake image this is (its fill value; JPEG may be off by a little)."""
  value = int(round(float(np.median(image))))
  return next(k for k in range(fake_data.DISTINCT_IMAGES) if abs(fake_data.image_value(k) - value) <= 2)


VOC = fake_data.VOC_SPLITS


def test_voc_splits_hold_the_right_images_and_masks(voc_data_dir):
  data_dir, sizes = voc_data_dir
  # train_aug = VOC train + SBD train + SBD val - VOC val = {0, 1, 2, 3} + {7, 8, 9} (4 and 5 are val).
  assert sizes == {"train": 4, "val": 3, "train_aug": 7}
  builder = tfds.builder("voc2012_segmentation", data_dir=str(data_dir))
  assert builder.info.metadata["num_classes"] == 21
  voc_classes = list(range(21)) + [255]
  for split, numbers in (("train", VOC["voc_train"]), ("val", VOC["voc_val"]),
                         ("train_aug", [0, 1, 2, 3, 7, 8, 9])):
    examples = _examples(builder, split)
    assert sorted(examples) == sorted(fake_data.voc_id(k) for k in numbers)
    for name, (image, label) in examples.items():
      k = int(name.split("_")[1])
      assert image.shape == (*fake_data.VOC_SHAPE, 3) and _image_number(image) == k
      # VOC's own mask (with 255 borders) wherever VOC has one, SBD's .mat (0..20) otherwise.
      has_voc_mask = k in VOC["voc_train"] or k in VOC["voc_val"]
      values = voc_classes if has_voc_mask else range(21)
      np.testing.assert_array_equal(label, fake_data.label_pattern(k, values, fake_data.VOC_SHAPE))
      assert set(np.unique(label)) <= set(voc_classes)


def test_ade20k_maps_other_to_255_and_shifts_the_classes(tmp_path):
  fake_data.make_ade20k(tmp_path / "manual", num_train=3, num_val=2)
  sizes = datasets.prepare("ade20k", str(tmp_path / "manual"), str(tmp_path / "tfds"))
  assert sizes == {"train": 3, "validation": 2}
  builder = tfds.builder("ade20k", data_dir=str(tmp_path / "tfds"))
  for split, offset in (("train", 0), ("validation", 20)):
    for name, (image, label) in _examples(builder, split).items():
      k = offset + int(name.split("_")[-1]) - 1
      raw = fake_data.label_pattern(k, range(151), fake_data.ADE_SHAPE).astype(int)
      np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))
      assert label.max() == 255 and 149 in label and _image_number(image) == k
  assert len(ade20k.CLASS_NAMES) == 150 and len(set(ade20k.CLASS_NAMES)) == 150


def test_cityscapes_label_ids_become_the_19_train_ids_when_read(tmp_path):
  fake_data.make_cityscapes(tmp_path / "manual")
  sizes = datasets.prepare("cityscapes", str(tmp_path / "manual"), str(tmp_path / "tfds"))
  assert sizes == {"train": 4, "validation": 2, "test": 2}
  # The mapping table: 19 label ids get 0..18 in order, every other value is ignored.
  table = cityscapes.LABEL_TABLE
  assert sorted(np.nonzero(table != 255)[0]) == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                 26, 27, 28, 31, 32, 33]
  assert table[table != 255].tolist() == list(range(19))
  config = tiny_config(tmp_path / "tfds")
  config.dataset.name = cityscapes.NAME
  config.dataset.eval_split = "validation"
  config.dataset.num_classes = 19
  config.eval.batch_size = 2
  config.eval.crop_size = fake_data.CITYSCAPES_SHAPE
  builder = input_pipeline.load_builder(config)
  ((batch, _),) = input_pipeline.eval_batches(builder, config)
  assert batch["mask"].all()
  for image, label in zip(batch["image"], batch["label"]):
    k = _image_number(image)
    raw = fake_data.label_pattern(k, range(34), fake_data.CITYSCAPES_SHAPE)
    np.testing.assert_array_equal(label, table[raw])
    assert set(np.unique(label)) == set(range(19)) | {255}


@pytest.fixture(scope="module")
def folder_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  fake_data.make_folder(root / "manual", {"train": 5, "val": 3}, num_classes=4)
  (root / "manual" / "classes.txt").write_text("sky\nroad\ncar\ntree\n")
  sizes = datasets.prepare("folder_segmentation", str(root / "manual"), str(root / "tfds"),
                          num_classes=4, ignore_label=255)
  return root, sizes


def test_folder_dataset_reads_images_masks_and_split_lists(folder_dirs):
  root, sizes = folder_dirs
  assert sizes == {"train": 5, "val": 3}
  builder = tfds.builder("folder_segmentation", data_dir=str(root / "tfds"))
  assert builder.info.metadata["num_classes"] == 4
  assert datasets.class_names("folder_segmentation", 4, builder.info.metadata) == (
      "sky", "road", "car", "tree")
  config = tiny_config(root / "tfds")
  config.dataset.name, config.dataset.num_classes = "folder_segmentation", 4
  config.eval.batch_size, config.eval.crop_size = 3, (10, 14)
  builder = input_pipeline.load_builder(config)
  ((batch, _),) = input_pipeline.eval_batches(builder, config)
  seen = set()
  for image, label in zip(batch["image"], batch["label"]):
    k = _image_number(image)  # the RGBA PNGs come out as RGB of the same value
    seen.add(k)
    np.testing.assert_array_equal(label, fake_data.label_pattern(k, [0, 1, 2, 3, 255], (10, 14)))
  assert seen == {5, 6, 7}
  config.dataset.num_classes = 5
  with pytest.raises(ConfigError, match=r"^config.dataset.num_classes=5 but folder_segmentation.* "
                                        r"has 4 classes; set it to 4$"):
    input_pipeline.load_builder(config)


def test_folder_dataset_refuses_bad_masks_and_missing_images(tmp_path):
  manual = tmp_path / "manual"
  fake_data.make_folder(manual, {"train": 2}, num_classes=4)
  with pytest.raises(DataError, match=r"img_0000.png has values \[3\] outside 0..2 and 255"):
    datasets.prepare("folder_segmentation", str(manual), str(tmp_path / "a"), num_classes=3)
  (manual / "train.txt").write_text("img_0000\nnot_there\n")
  with pytest.raises(DataError, match=r"no image for 'not_there' in .*images"):
    datasets.prepare("folder_segmentation", str(manual), str(tmp_path / "b"), num_classes=4)
  assert not tfds.builder("folder_segmentation", data_dir=str(tmp_path / "b")).is_prepared()
  (manual / "train.txt").write_text("img_0000\nimg_0001\nimg_0000\n")
  with pytest.raises(DataError, match=r"train.txt names \['img_0000'\] more than once"):
    datasets.prepare("folder_segmentation", str(manual), str(tmp_path / "c"), num_classes=4)


def test_prepare_names_the_missing_files_and_where_to_get_them(tmp_path):
  (tmp_path / "manual").mkdir()
  fake_data.make_ade20k(tmp_path / "other", 1, 1)  # the wrong data set's archive is no help
  os.replace(tmp_path / "other" / "ADEChallengeData2016.zip",
             tmp_path / "manual" / "ADEChallengeData2016.zip")
  result = run_module(["deeplab_jax.datasets.prepare", "voc2012_segmentation",
                       f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'tfds'}"])
  assert result.returncode == DataError.exit_code
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"deeplab_jax: error: {tmp_path / 'manual'} lacks "
                         "VOCtrainval_11-May-2012.tar (or its VOCdevkit/VOC2012/ folder), "
                         "benchmark.tgz (or its benchmark_RELEASE/dataset/ folder); get ")
  assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/" in line
  assert not (tmp_path / "tfds").exists()


def test_resize_to_range_follows_the_official_rule():
  def size(h, w, *args):
    image = tf.zeros((h, w, 3), tf.uint8)
    label = tf.zeros((h, w, 1), tf.uint8)
    out_image, out_label = input_pipeline.resize_to_range(image, label, *args)
    assert out_image.shape[:2] == out_label.shape[:2]
    return tuple(out_image.shape[:2])

  # ADE20K's 513 / 513 / 16: the longer side goes to 513, the shorter one up to 16k + 1.
  assert size(300, 200, 513, 513, 16) == (513, 353)  # 342 -> 353
  assert size(683, 512, 513, 513, 16) == (513, 385)  # 384 -> 385
  assert size(100, 100, 513, 513, 16) == (513, 513)
  assert size(300, 200, 400) == (600, 400)  # no max: the shorter side to min
  assert size(300, 200, 400, 500) == (500, 333)  # 600 > 500: the longer side to max instead
