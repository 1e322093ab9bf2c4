"""Input pipeline: deterministic order that resumes at any step, the SPEC augmentation's invariants,
evaluation that counts every pixel once (across processes too), clear errors for missing data."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, initialized_evaluation, load_config, tiny_config
from deeplab_jax import input_pipeline, metrics
from deeplab_jax.errors import DataError


def _batches(config, start_step, count):
  builder = input_pipeline.load_builder(config)
  iterator = input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config, start_step))
  return [next(iterator) for _ in range(count)]


def test_train_batches_repeat_and_resume_at_any_step_across_epochs(tiny_data_dir):
  config = tiny_config(tiny_data_dir)  # 48 train examples, batch 2: 24 steps per epoch
  reference = _batches(config, 0, 28)
  again = _batches(config, 0, 3)
  for a, b in zip(reference, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for start in (5, 23, 25):
    resumed = _batches(config, start, 2)
    for k, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["image"], reference[start + k]["image"])
      np.testing.assert_array_equal(batch["label"], reference[start + k]["label"])
  # Epochs are reshuffled: the second epoch is not the first one again.
  assert not np.array_equal(reference[0]["image"], reference[24]["image"])
  config.seed = 1
  assert not np.array_equal(_batches(config, 0, 1)[0]["image"], reference[0]["image"])


def _matches(batch, spec):
  """A one-process batch against the spec deeplab_jax.aot compiles for (its global shapes)."""
  assert set(batch) == set(spec)
  for key, array in batch.items():
    assert (array.shape, array.dtype) == (spec[key].shape, spec[key].dtype), key


def test_train_batches_have_the_crop_shape_and_only_class_or_ignore_labels(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  for batch in _batches(config, 0, 5):
    assert batch["image"].shape == (2, 33, 33, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 33, 33) and batch["label"].dtype == np.uint8
    _matches(batch, input_pipeline.train_batch_spec(config))
    assert set(np.unique(batch["label"])) <= set(range(6)) | {255}
    assert 0 <= batch["image"].min() and batch["image"].max() <= 255


def _augment(image, label, seed, **overrides):
  kwargs = dict(crop_size=(12, 12), min_scale=1.0, max_scale=1.0, scale_step=0.25, flip=True,
                ignore_label=255) | overrides
  out = input_pipeline.augment(tf.constant(image), tf.constant(label), tf.constant(seed, tf.int64),
                               **kwargs)
  return [x.numpy() for x in out]


def test_crop_and_flip_keep_image_and_label_aligned_and_pad_with_127_5_and_255():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 6, (9, 7, 1)).astype(np.uint8)
  image = np.repeat(label * 40, 3, axis=-1).astype(np.uint8)  # pixel value encodes its label
  flips = set()
  for seed in range(12):
    out_image, out_label = _augment(image, label, [seed, 0])
    real = out_label[..., 0] != 255
    assert real.sum() == 9 * 7  # the whole 9x7 image sits inside the 12x12 crop
    np.testing.assert_array_equal(out_image[real], (out_label[real] * 40.0).repeat(3, -1)
                                  .reshape(-1, 3))
    np.testing.assert_array_equal(out_image[~real], 127.5)
    rows, cols = np.nonzero(real)
    region = out_label[rows.min():rows.max() + 1, cols.min():cols.max() + 1, 0]
    flips.add("flipped" if np.array_equal(region, label[:, ::-1, 0]) else
              "kept" if np.array_equal(region, label[..., 0]) else "broken")
  assert flips == {"flipped", "kept"}


def test_scale_uses_the_configured_set_and_nearest_labels():
  label = np.zeros((40, 40, 1), np.uint8)
  label[10:30, 10:30] = 3
  image = np.zeros((40, 40, 3), np.uint8)
  sizes = set()
  for seed in range(40):
    out_image, out_label = _augment(image, label, [seed, 1], crop_size=(100, 100), min_scale=0.5,
                                    max_scale=2.0, flip=False)
    real = out_label[..., 0] != 255
    sizes.add(int(real.sum(axis=0).max()))
    assert set(np.unique(out_label)) <= {0, 3, 255}
  assert sizes == {20, 30, 40, 50, 60, 70, 80}  # 40 * {0.5, 0.75, ..., 2.0}


def test_scale_crop_and_flip_keep_each_pixel_on_its_own_label():
  """Each pixel carries its source (row, col) in two channels and the label is a function of them.
  Bilinear scaling reproduces a linear function exactly, so after scale, pad, crop and flip every
  image pixel still says where it came from, and its label must be that of the nearest source pixel
  (align_corners nearest, as the official code); padding is 127.5 in all channels and 255 below."""
  h, w, step = 23, 31, 8
  rows, cols = np.mgrid[0:h, 0:w]
  image = np.stack([rows * step, cols * step, np.full_like(rows, 200)], -1).astype(np.uint8)
  truth = ((3 * rows + 5 * cols) % 21).astype(np.uint8)
  truth[rows == 0] = 255  # an ignored band must travel with its pixels too
  seen = set()
  for seed in range(24):
    out_image, out_label = _augment(image, truth[..., None], [seed, 7], crop_size=(24, 24),
                                    min_scale=0.5, max_scale=2.0)
    out_label = out_label[..., 0]
    padded = out_image[..., 2] == 127.5
    np.testing.assert_array_equal(out_image[padded], 127.5)
    np.testing.assert_array_equal(out_label[padded], 255)
    real = ~padded
    np.testing.assert_allclose(out_image[real][:, 2], 200, atol=1e-3)
    src_row, src_col = out_image[real][:, 0] / step, out_image[real][:, 1] / step
    # Skip exact .5 ties, where float rounding may fall either way.
    clear = (np.abs(src_row % 1 - 0.5) > 1e-3) & (np.abs(src_col % 1 - 0.5) > 1e-3)
    expected = truth[np.round(src_row[clear]).astype(int), np.round(src_col[clear]).astype(int)]
    np.testing.assert_array_equal(out_label[real][clear], expected)
    assert clear.mean() > 0.5
    assert set(np.unique(out_label)) <= set(range(21)) | {255}
    seen.add("padded" if padded.any() else "cropped")
    cols_out = out_image[real.all(1)][:, :, 1] if real.all(1).any() else None
    if cols_out is not None:
      seen.add("flipped" if cols_out[0, 0] > cols_out[0, -1] else "kept")
  assert seen == {"padded", "cropped", "flipped", "kept"}


def _count_real_pixels(builder, split):
  total = 0
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    total += int(np.sum(example["segmentation"] != 255))
  return total


@pytest.mark.parametrize("process_count", [1, 3])
def test_evaluation_batches_count_every_pixel_once(tiny_data_dir, monkeypatch, process_count):
  """12 val images of 112-128 px, eval crop 120, batches of 3 rows per process: images that fit are
  padded whole (`mask`), the others cut into sliding windows padded to the crop, whose rows carry
  where they lie. The whole rows' labelled pixels plus each windowed image's, counted when its last
  window passes, are exactly the split's labelled pixels; its windows cover it; `more` holds until
  the process's last batch (processes make different numbers of batches, and step together by it)."""
  config = tiny_config(tiny_data_dir)
  config.eval.batch_size = 3 * process_count
  config.eval.crop_size = (120, 120)
  builder = input_pipeline.load_builder(config)
  total, whole, windowed = np.zeros((6, 6), np.int64), 0, 0
  for index in range(process_count):
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    batches = list(input_pipeline.eval_batches(builder, config))
    covered = {}
    for n, (batch, windows) in enumerate(batches):
      assert batch["image"].shape == (3, 120, 120, 3) and len(windows) == 3
      if process_count == 1:
        _matches(batch, input_pipeline.eval_batch_spec(config))
      assert set(batch["more"]) == {n < len(batches) - 1}
      whole += int(batch["mask"].sum())
      total += np.asarray(metrics.confusion_matrix(batch["label"], batch["label"], 6,
                                                   mask=batch["mask"]))
      for k, window in enumerate(windows):
        if window is None:
          continue
        assert not batch["mask"][k] and max(window.label.shape) > 120
        tile = np.s_[window.top:window.top + window.height, window.left:window.left + window.width]
        np.testing.assert_array_equal(batch["label"][k, :window.height, :window.width],
                                      window.label[tile])
        assert (batch["label"][k, window.height:] == 255).all()  # the padding counts nothing
        assert (batch["image"][k, :, window.width:] == input_pipeline.IMAGE_PAD_VALUE).all()
        covered.setdefault(window.index, np.zeros(window.label.shape, int))[tile] += 1
        if window.last:
          assert covered[window.index].min() >= 1
          windowed += 1
          total += metrics.confusion_matrix_numpy(window.label, window.label, 6)
    padding = [w is None and not m for batch, windows in batches
               for w, m in zip(windows, batch["mask"])]
    assert sum(padding) < 3  # filler only in the last batch
  assert whole + windowed == 12 and whole > 0 and windowed > 0
  assert total.sum() == np.trace(total) == _count_real_pixels(builder, "val")


def test_voc_without_data_stops_with_how_to_prepare_it(tmp_path):
  config = load_config(os.path.join(REPO, "configs", "voc_xception.py"))
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(DataError) as e:
    input_pipeline.load_builder(config)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"data set 'voc2012_segmentation' is not prepared in {tmp_path}")
  assert "VOCtrainval_11-May-2012.tar" in message and "benchmark.tgz" in message
  assert "python -m deeplab_jax.datasets.prepare voc2012_segmentation" in message


def test_two_processes_read_disjoint_shards_and_cover_every_example(tmp_path):
  """Two JAX processes on localhost (2 CPU devices each, `jax.distributed`): per epoch, together they
  read each of the 20 training images once; each global batch on the 4-device mesh is the two local
  batches; evaluation sees each of the 7 validation images exactly once."""
  import socket
  import subprocess
  import sys

  import fake_data
  from deeplab_jax import datasets
  # The first two val images (process 0's shard) are larger than the workers' second eval crop.
  fake_data.make_folder(tmp_path / "manual", {"train": 20, "val": 7}, num_classes=4,
                        sizes={20: (40, 30), 21: (36, 50)})
  datasets.prepare("folder_segmentation", str(tmp_path / "manual"), str(tmp_path / "tfds"),
                   num_classes=4)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  worker = os.path.join(REPO, "tests", "two_process_worker.py")
  outs = [tmp_path / f"process_{i}.json" for i in range(2)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(tmp_path / "tfds"),
                             str(outs[i])], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  runs = [json.loads(out.read_text()) for out in outs]
  assert all(r["process_count"] == 2 and r["devices"] == 4 for r in runs)
  steps_per_epoch = 5  # 20 images / global batch 4
  for epoch in range(2):
    steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    local = [[k for s in steps for k in r["train_local"][s]] for r in runs]
    assert not set(local[0]) & set(local[1])
    assert sorted(local[0] + local[1]) == list(range(20))
  for s in range(len(runs[0]["train_global"])):
    # The global batch holds both processes' rows, and both processes see the same one.
    assert runs[0]["train_global"][s] == runs[1]["train_global"][s]
    assert sorted(runs[0]["train_global"][s]) == sorted(runs[0]["train_local"][s] +
                                                        runs[1]["train_local"][s])
  evaluated = [k for r in runs for batch in r["eval_local"] for k in batch]
  assert sorted(evaluated) == list(range(20, 27))
  # Training's evaluation, its processes stepping together over unequal shards, counts what one
  # process counts.
  config = tiny_config(tmp_path / "tfds")
  config.dataset.name, config.dataset.num_classes = "folder_segmentation", 4
  config.eval.crop_size = (17, 17)
  reference = initialized_evaluation(config)["confusion_matrix"]
  assert runs[0]["evaluation"] == runs[1]["evaluation"]
  got = np.asarray(runs[0]["evaluation"])
  assert got.sum() == reference.sum() == sum(
      int(np.sum(fake_data.label_pattern(k, [0, 1, 2, 3, 255], shape) != 255)) for k, shape in
      [(20, (40, 30)), (21, (36, 50))] + [(k, (10, 14)) for k in range(22, 27)])
  # 4 devices against 1: float32 rounding may flip a pixel whose two best logits (nearly) tie.
  assert np.abs(got - reference).sum() <= 0.01 * reference.sum()
  # BatchNorm statistics and their gradient over both processes' rows equal one device's.
  from deeplab_jax.models.batch_norm import batch_norm_train
  bn = runs[0]["bn"]
  image = np.asarray(bn["image"], np.float32)

  def bn_loss(x):
    y = batch_norm_train(x, jax.numpy.ones(3), jax.numpy.zeros(3), 1e-3)[0]
    return jax.numpy.sum(y * jax.numpy.linspace(-1.0, 1.0, y.size).reshape(y.shape))

  value, grad = jax.value_and_grad(bn_loss)(image)
  assert abs(bn["value"] - float(value)) <= 1e-5 * abs(float(value))
  np.testing.assert_allclose(np.asarray(bn["grad"]), np.asarray(grad), rtol=0,
                             atol=1e-5 * float(np.max(np.abs(grad))))
