"""Every command line as the README writes it, on a workdir that the real main trained with the config's
default model values (no test-only depthwise or allocator choice); bad input to each is in
test_reliability."""
import json
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from conftest import REPO, TINY_FLAGS
from deeplab_jax import infer
from deeplab_jax.datasets import shapes
from deeplab_jax.errors import ConfigError


def _start(args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


@pytest.mark.reliability  # the SavedModel's refusal of an image larger than its crop
def test_infer_evaluate_and_export_work_on_a_default_workdir(trained_workdir, tmp_path):
  source, data_dir = trained_workdir
  workdir = tmp_path / "w"  # evaluate writes into it; the session's run is read-only
  shutil.copytree(source, workdir)
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["depthwise_impl"] == "auto"  # the default path: native on one CPU device
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(3)
  for k, (h, w) in enumerate([(100, 120), (128, 128)]):
    Image.fromarray(shapes.generate_example(rng, h, w)[0]).save(images / f"{k}.png")
  # The three commands as the README writes them, run side by side (two cores, mostly compiling).
  commands = {
      "infer": ["deeplab_jax.infer", f"--workdir={workdir}", f"--input={images}",
                f"--output={tmp_path / 'labels'}"],
      "evaluate": ["deeplab_jax.evaluate", "--config=configs/shapes.py", f"--workdir={workdir}",
                   *[f for f in TINY_FLAGS if f.startswith("--config.dataset.name=")],
                   f"--config.dataset.data_dir={data_dir}"],
      "export": ["deeplab_jax.export", f"--workdir={workdir}", f"--output={tmp_path / 'savedmodel'}"],
  }
  running = {name: _start(args) for name, args in commands.items()}
  results = {name: _finish(process) for name, process in running.items()}
  for name, (code, out, err) in results.items():
    assert code == 0, (name, err[-3000:])
  assert results["infer"][1].strip().splitlines()[-1].startswith("deeplab_jax: segmented 2 images")
  assert results["evaluate"][1].strip().splitlines()[-1].startswith("deeplab_jax: mean IoU ")
  assert "depthwise convs as 'shift'" in results["export"][1]
  assert (workdir / "eval").is_dir()
  # Each console: one result line (and infer's bar on a terminal only); the details in a log file.
  for name, log in (("infer", tmp_path / "labels" / "infer.log"), ("export", tmp_path / "savedmodel" /
                    "export.log"), ("evaluate", workdir / "eval" / "evaluate.log")):
    code, out, err = results[name]
    assert len((out + err).strip().splitlines()) == 1, (name, out, err)
    assert log.read_text().startswith("--- "), name
  assert "per class: {'background'" in (workdir / "eval" / "evaluate.log").read_text()

  # The SavedModel (any size up to the eval crop, 129) gives the predictor's labels: images of 66-129
  # px pad to 129 in both, so the two see the same input. They are two compilations (TensorFlow's
  # XLA and jaxlib's; shift against the native kernel) that round differently, so a pixel whose two
  # best classes tie to within 1e-4 in probability may go either way; every other pixel must agree.
  predictor = infer.Predictor.from_workdir(workdir)
  assert predictor.model.depthwise_impl == "native"
  serve = tf.saved_model.load(str(tmp_path / "savedmodel")).signatures["serving_default"]
  for height, width in ((129, 129), (100, 77)):
    batch = rng.integers(0, 256, (3, height, width, 3)).astype(np.uint8)
    labels = serve(images=tf.constant(batch))["labels"].numpy()
    assert labels.shape == (3, height, width) and labels.dtype == np.uint8
    probabilities = np.stack(predictor.predict_proba(batch))
    top2 = np.sort(probabilities, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4
    np.testing.assert_array_equal(labels[decided], probabilities.argmax(-1)[decided])
    assert decided.mean() > 0.99, decided.mean()
  with pytest.raises(tf.errors.InvalidArgumentError, match="at most 129x129"):
    serve(images=tf.constant(np.zeros((1, 130, 20, 3), np.uint8)))
  for k in range(2):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels" / f"{k}.png")),
                                  predictor.predict(str(images / f"{k}.png")))


def test_export_takes_the_reference_formulation_and_refuses_one_it_cannot_serialize(
    trained_workdir, tmp_path):
  from deeplab_jax import export
  predictor = infer.Predictor.from_workdir(trained_workdir[0])
  with pytest.raises(ConfigError, match="depthwise_impl='native' cannot be serialized"):
    export.export(predictor, tmp_path / "native", depthwise_impl="native")
  assert not (tmp_path / "native").exists()
  path = export.export(predictor, tmp_path / "grouped", depthwise_impl="grouped")
  serve = tf.saved_model.load(str(path)).signatures["serving_default"]
  labels = serve(images=tf.constant(np.zeros((2, 40, 50, 3), np.uint8)))["labels"].numpy()
  assert labels.shape == (2, 40, 50) and labels.max() < 6


def test_an_unexpected_exception_keeps_its_traceback_and_ends_in_a_line_saying_so(capsys):
  from deeplab_jax import runtime

  def buggy():
    raise ValueError("\nsomething internal\n\n")

  with pytest.raises(SystemExit) as e:
    runtime.run_command(buggy, compile_cache=False)
  assert e.value.code == runtime.BUG_EXIT
  err = capsys.readouterr().err
  assert "Traceback" in err
  assert err.strip().splitlines()[-1] == (
      "deeplab_jax: error: unexpected ValueError: something internal (a bug in deeplab_jax or its "
      "libraries: please report it with the traceback above)")
  # A full disk during a save is the user's machine, not a bug: one line, its own code.
  def full_disk():
    raise OSError(28, "No space left on device", "/work/ckpt/100")

  with pytest.raises(SystemExit) as e:
    runtime.run_command(full_disk, compile_cache=False)
  assert e.value.code == runtime.OS_ERROR_EXIT
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("deeplab_jax: error: /work/ckpt/100 could not be written: the disk is full")
