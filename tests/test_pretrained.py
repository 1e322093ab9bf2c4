"""Trained DeepLabs from their weights alone (issue 30): an official model-zoo tarball, its folder, a
checkpoint prefix or a converted folder give the same predictor as the weights loaded by hand and as
a training run initialized from them; the three commands take `--weights`; bad weights are one line."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import fake_weights as fw
from conftest import REPO, load_config, run_module
from deeplab_jax import infer, train
from deeplab_jax.errors import WeightsError
from deeplab_jax.weights import convert, mapping

IMAGES = [np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8)
          for k, size in enumerate([(96, 128, 3), (71, 90, 3)])]


def _by_hand(folder):
  """What a user had to write before from_pretrained: the config, convert, unflatten."""
  config = load_config(os.path.join(REPO, "configs", "voc_xception.py"))
  config.model.backbone, config.model.depth_multiplier = "mobilenet_v2", 0.5
  config.model.atrous_rates, config.model.use_decoder, config.model.aspp_separable = (), False, False
  config.model.strided_padding = "same"  # official TF MobileNetV2
  tree, _ = convert.convert("tf_deeplab", None, folder / "model.ckpt")
  return infer.Predictor(config, mapping.unflatten(tree))


def test_every_form_of_the_weights_gives_the_probabilities_of_the_weights_loaded_by_hand(
    zoo_tarball, tmp_path):
  tarball, folder, _ = zoo_tarball
  expected = [_by_hand(folder).predict_proba(image) for image in IMAGES]
  tree, info = convert.convert("tf_deeplab", None, folder / "model.ckpt")
  converted = convert.save(tmp_path / "converted", tree, info)
  for form in (tarball, folder.parent, folder, folder / "model.ckpt", converted):  # parent: one level up
    predictor = infer.Predictor.from_pretrained(form)
    assert predictor.config.dataset.name == "voc2012_segmentation" and predictor.num_classes == 21
    assert predictor.class_names[15] == "person" and predictor.palette == "voc"
    assert predictor.config.model.strided_padding == "same" and predictor.window == (513, 513)
    for image, want in zip(IMAGES, expected):
      np.testing.assert_array_equal(predictor.predict_proba(image), want)
  options = infer.Predictor.from_pretrained(tarball, output_stride=8, scales=(0.75, 1.0), flip=True)
  assert (options.output_stride, options.scales, options.flip) == (8, (0.75, 1.0), True)
  assert options.predict(IMAGES[1]).shape == (71, 90)


def test_a_training_run_initialized_from_the_weights_predicts_the_same(zoo_tarball, voc_data_dir,
                                                                       tmp_path):
  """`config.init_from.scope=all` then `from_workdir`: one step at a learning rate too small to move
  any float32 weight, with BatchNorm frozen, so the checkpoint holds the weights as loaded."""
  tarball, folder, _ = zoo_tarball
  tree, info = convert.convert("tf_deeplab", None, folder / "model.ckpt")
  converted = convert.save(tmp_path / "converted", tree, info)
  config = _by_hand(folder).config
  config.dataset.data_dir = str(voc_data_dir[0])
  config.init_from.path, config.init_from.scope = str(converted), "all"
  config.input.crop_size, config.eval.crop_size = (33, 33), (17, 17)  # the fake VOC images are 9x11
  config.train.steps, config.train.batch_size, config.train.log_every_steps = 1, 2, 1
  config.eval.batch_size, config.checkpoint.every_steps = 2, 1
  config.optim.base_lr, config.model.freeze_bn = 1e-30, True
  train.train_and_evaluate(config, str(tmp_path / "work"))
  from_run = infer.Predictor.from_workdir(tmp_path / "work", window=(513, 513))
  zoo = infer.Predictor.from_pretrained(tarball)
  for image in IMAGES:
    np.testing.assert_array_equal(from_run.predict_proba(image), zoo.predict_proba(image))


def test_the_commands_take_weights_with_their_defaults(zoo_tarball, voc_data_dir, tmp_path):
  tarball, _, _ = zoo_tarball
  from PIL import Image
  (tmp_path / "images").mkdir()
  Image.fromarray(IMAGES[0]).save(tmp_path / "images" / "a.png")
  commands = {
      "infer": ["deeplab_jax.infer", f"--weights={tarball}", f"--input={tmp_path / 'images'}",
                f"--output={tmp_path / 'labels'}"],
      "evaluate": ["deeplab_jax.evaluate", "--config=configs/voc_xception.py", f"--weights={tarball}",
                   f"--config.dataset.data_dir={voc_data_dir[0]}", f"--output={tmp_path / 'eval'}"],
      "export": ["deeplab_jax.export", f"--weights={tarball}", f"--output={tmp_path / 'savedmodel'}"],
  }
  running = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}  # side by side: mostly compiling, on two cores
  results = {}
  for name, process in running.items():
    out, err = process.communicate(timeout=300)
    results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
  for name, result in results.items():
    assert result.returncode == 0, (name, result.stderr[-3000:])
    assert len((result.stdout + result.stderr).strip().splitlines()) == 1, (name, result.stderr)
  zoo = infer.Predictor.from_pretrained(tarball)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels" / "a.png")),
                                zoo.predict(IMAGES[0]))
  assert results["evaluate"].stdout.startswith("deeplab_jax: mean IoU ")
  (written,) = (tmp_path / "eval").glob("pretrained_val_os16_scales1.json")
  assert json.loads(written.read_text())["images"] == 3  # fake VOC val
  assert f"exported {tarball}" in results["export"].stdout
  assert (tmp_path / "savedmodel" / "saved_model.pb").exists()


@pytest.mark.reliability
def test_bad_weights_are_one_line_naming_the_fix(zoo_tarball, x65_backbone_only, tmp_path):
  tarball, folder, values = zoo_tarball

  def refused(path, match):
    with pytest.raises(WeightsError, match=match):
      infer.Predictor.from_pretrained(path)

  refused(x65_backbone_only, "without a DeepLab head .*--config.init_from.scope=backbone")
  fw.write_safetensors(tmp_path / "timm.safetensors", {"conv1.weight": np.zeros((2, 3, 1, 1), np.float32)})
  refused(tmp_path / "timm.safetensors", "timm / PyTorch file.*--config.init_from.format=timm")
  with tarfile.open(tmp_path / "empty.tar.gz", "w:gz") as archive:
    archive.add(folder / "frozen_inference_graph.pb", arcname="x/frozen_inference_graph.pb")
  refused(tmp_path / "empty.tar.gz", "holds no TF checkpoint .* model-zoo tarball")
  data = tarball.read_bytes()
  (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
  refused(tmp_path / "cut.tar.gz", "is truncated or not a tar archive .* download it again")
  other = {"vgg_16/conv1/weights": np.zeros((3, 3, 3, 8), np.float32)}
  fw.write_tf_checkpoint(tmp_path / "vgg" / "model.ckpt", other, training_state=False)
  refused(tmp_path / "vgg" / "model.ckpt", "holds no single official DeepLab backbone scope")
  refused(tmp_path / "nothing", "does not exist or holds no weights")
  result = run_module(["deeplab_jax.infer", f"--weights={tarball}", f"--workdir={tmp_path}",
                       f"--input={tmp_path}", f"--output={tmp_path / 'out'}"])
  assert result.returncode == 2 and not (tmp_path / "out").exists()
  assert result.stderr.strip().splitlines() == [
      "deeplab_jax: error: give --workdir (a training run) or --weights (pretrained weights), not "
      "both; see --helpshort"]


@pytest.fixture
def x65_backbone_only(tmp_path):
  """An ImageNet MobileNetV2 checkpoint as TF-slim publishes it (no DeepLab head)."""
  shapes, _, _ = fw.mobilenet_v2(0.5, imagenet_classes=1001)
  fw.write_tf_checkpoint(tmp_path / "imagenet" / "model.ckpt", fw.random_values(shapes),
                         training_state=False)
  return tmp_path / "imagenet" / "model.ckpt"


def test_official_ade20k_models_lose_the_other_class_and_odd_counts_get_generic_names(tmp_path):
  backbone, low_level, features = fw.mobilenet_v2(0.5)
  for classes in (151, 7):
    shapes = {**backbone, **fw.deeplab_head(features, low_level, classes, rates=0, decoder=False)}
    values = fw.random_values(shapes, seed=3)
    fw.write_tf_checkpoint(tmp_path / str(classes) / "model.ckpt", values)
    predictor = infer.Predictor.from_pretrained(tmp_path / str(classes))
    if classes == 151:  # "other" (0) was ignored in the official training; our ade20k ids are 1..150 - 1
      assert predictor.config.dataset.name == "ade20k" and predictor.num_classes == 150
      kernel = np.asarray(predictor.variables["params"]["logits"]["semantic"]["kernel"])
      np.testing.assert_array_equal(kernel[0, 0], values["logits/semantic/weights"][0, 0, :, 1:])
      assert predictor.class_names[0] == "wall"
    else:
      assert predictor.class_names == tuple(f"class_{k}" for k in range(7))
