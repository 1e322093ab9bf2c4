"""Backbones, heads and the DeepLab model: shapes, output strides, low-level features, dtypes, names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_close_at_scale, random_variables
from deeplab_jax import config as config_lib
from deeplab_jax.models import create_model, heads, upsample_logits
from deeplab_jax.models.mobilenet_v2 import MobileNetV2
from deeplab_jax.models.resnet import ResNet
from deeplab_jax.models.xception import Xception


def model_config(**overrides):
  config = config_lib.default_config()
  for key, value in overrides.items():
    setattr(config.model, key, value)
  return config


def shapes(tree):
  return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)


def backbone_module(name, **kw):
  if name.startswith("xception"):
    return Xception(variant=name, **kw)
  if name.startswith("resnet"):
    return ResNet(variant=name, **kw)
  return MobileNetV2(**kw)


# Full-width backbones at a 513 input (shapes only, nothing computed): SPEC's sizes and channels.
@pytest.mark.parametrize("name,low_channels", [
    ("xception_41", 256), ("xception_65", 256), ("xception_71", 256), ("resnet_50_beta", 256),
    ("resnet_101_beta", 256), ("resnet_50", 256), ("resnet_101", 256), ("mobilenet_v2", 144)])
def test_backbone_features_and_low_level_at_513(name, low_channels):
  final_channels = 320 if name == "mobilenet_v2" else 2048
  x = jax.ShapeDtypeStruct((1, 513, 513, 3), jnp.float32)
  module = backbone_module(name)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, False), x)
  for output_stride, size in ((8, 65), (16, 33), (32, 17)):  # one parameter tree for all three
    module = backbone_module(name, output_stride=output_stride)
    features, low = jax.eval_shape(lambda v, x: module.apply(v, x, False), variables, x)
    assert features.shape == (1, size, size, final_channels)
    assert low.shape == (1, 129, 129, low_channels)  # stride 4


# Trainable parameter counts of the backbones against torchvision's published models (no classifier;
# MobileNetV2 also without its last 1x1 conv to 1280): a check of the whole layout.
@pytest.mark.parametrize("name,count", [("resnet_50", 23_508_032), ("resnet_101", 42_500_160),
                                        ("mobilenet_v2", 1_811_712), ("xception_65", 37_867_312)])
def test_backbone_parameter_counts(name, count):
  module = backbone_module(name)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, False),
                             jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"])) == count


def test_mobilenet_depth_multiplier_half():
  module = MobileNetV2(depth_multiplier=0.5)
  x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, False), x)
  features, low = jax.eval_shape(lambda v, x: module.apply(v, x, False), variables, x)
  assert features.shape[-1] == 160 and low.shape == (1, 17, 17, 96)
  assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 16)


@pytest.mark.parametrize("name", ["xception_41", "xception_65", "xception_71", "resnet_50_beta",
                                  "resnet_101_beta", "resnet_50", "resnet_101", "mobilenet_v2"])
def test_every_backbone_runs_forward(name):
  """The full-width model computes finite logits of the right shape at a small input."""
  model = create_model(model_config(backbone=name))
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (1, 33, 33, 3)), jnp.float32)
  variables = random_variables(model, x.shape)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (1, 9, 9, 21) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits))) and float(jnp.std(logits)) > 0


def test_one_parameter_tree_serves_output_strides_8_16_32():
  config = model_config(backbone="xception_41", depth_multiplier=0.125, use_decoder=False)
  trees = [shapes(jax.eval_shape(create_model(config, os).init, jax.random.key(0),
                                 jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)))
           for os in (8, 16, 32)]
  assert trees[0] == trees[1] == trees[2]
  # Trained at OS16, evaluated at 8 and 32 with the very same variables.
  model16 = create_model(config)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (1, 65, 65, 3)), jnp.float32)
  variables = random_variables(model16, x.shape)
  sizes = {}
  for os in (8, 16, 32):
    model = create_model(config, os)
    assert model.atrous_rates == {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[os]
    logits = jax.jit(model.apply)(variables, x)  # DeepLabv3: logits at the output stride
    sizes[os] = logits.shape[1]
    assert bool(jnp.all(jnp.isfinite(logits)))
  assert sizes == {8: 9, 16: 5, 32: 3}


def test_full_xception65_parameter_tree_is_the_same_at_every_output_stride():
  trees = [shapes(jax.eval_shape(create_model(config_lib.default_config(), os).init,
                                 jax.random.key(0), jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)))
           for os in (8, 16, 32)]
  assert trees[0] == trees[1] == trees[2]


def test_decoder_logits_at_stride_4_and_upsampling():
  config = model_config(backbone="mobilenet_v2", depth_multiplier=0.5)
  model = create_model(config)
  x = jnp.zeros((2, 65, 65, 3))
  variables = random_variables(model, x.shape)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 17, 17, 21)
  up = upsample_logits(logits, (65, 65))
  assert up.shape == (2, 65, 65, 21)
  np.testing.assert_allclose(up[:, ::4, ::4], logits, rtol=1e-5, atol=1e-5)  # 16k+1 grid aligns


def test_parameter_names_are_stable_and_readable():
  """Names follow the official variable scopes; weight importers depend on them."""
  model = create_model(config_lib.default_config())
  v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  p = v["params"]
  assert p["backbone"]["entry_flow_conv1_1"]["kernel"].shape == (3, 3, 3, 32)
  unit = p["backbone"]["entry_flow_block2"]["unit_1"]
  assert unit["separable_conv2"]["depthwise"]["kernel"].shape == (3, 3, 1, 256)
  assert unit["separable_conv2"]["pointwise"]["bn"]["scale"].shape == (256,)
  assert unit["shortcut"]["kernel"].shape == (1, 1, 128, 256)
  assert set(p["backbone"]["middle_flow_block1"]) == {f"unit_{i}" for i in range(1, 17)}
  assert set(p["aspp"]) == {"image_pooling", "aspp0", "aspp1", "aspp2", "aspp3", "concat_projection"}
  assert set(p["decoder"]) == {"feature_projection0", "decoder_conv0", "decoder_conv1"}
  assert p["logits"]["semantic"]["kernel"].shape == (1, 1, 256, 21)
  assert p["logits"]["semantic"]["bias"].shape == (21,)
  biases = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)
            if "bias" in jax.tree_util.keystr(k) and "'bn'" not in jax.tree_util.keystr(k)]
  assert biases == ["['logits']['semantic']['bias']"]  # the only non-BN bias in the model
  resnet = jax.eval_shape(create_model(model_config(backbone="resnet_101_beta")).init,
                          jax.random.key(0), jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  rb = resnet["params"]["backbone"]
  assert set(rb) == {"conv1_1", "conv1_2", "conv1_3", "block1", "block2", "block3", "block4"}
  assert len(rb["block3"]) == 23 and "shortcut" in rb["block1"]["unit_1"]


def test_bfloat16_forward_is_close_to_float32():
  config = model_config(backbone="xception_41", depth_multiplier=0.25)
  model32 = create_model(config)
  config.model.dtype = "bfloat16"
  model16 = create_model(config)
  x = jnp.asarray(np.random.default_rng(3).uniform(0, 255, (2, 49, 49, 3)), jnp.float32)
  variables = random_variables(model32, x.shape)
  assert shapes(variables) == shapes(random_variables(model16, x.shape))  # float32 params either way
  y32 = jax.jit(model32.apply)(variables, x)
  y16 = jax.jit(model16.apply)(variables, x)
  assert y16.dtype == jnp.float32  # logits for the loss stay float32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 0.05, rel
  assert float(jnp.mean(jnp.argmax(y16, -1) == jnp.argmax(y32, -1))) > 0.9
  # Training-mode BN in bfloat16 still keeps float32 statistics (shapes only: nothing to compute).
  _, updates = jax.eval_shape(lambda v, x: model16.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}), variables, x)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}


def train_apply(model):
  return jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": key}))


def test_train_mode_updates_bn_statistics_and_freeze_bn_does_not():
  config = model_config(backbone="mobilenet_v2", depth_multiplier=0.5)
  x = jnp.asarray(np.random.default_rng(4).uniform(0, 255, (2, 33, 33, 3)), jnp.float32)
  model = create_model(config)
  variables = random_variables(model, x.shape)
  step = train_apply(model)
  a, updates = step(variables, x, jax.random.key(1))
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  # Dropout is on in training only: two dropout keys differ, eval is deterministic.
  b, _ = step(variables, x, jax.random.key(2))
  assert not np.allclose(a, b)
  evaluate = jax.jit(model.apply)
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
  config.model.freeze_bn = True
  _, updates = train_apply(create_model(config))(variables, x, jax.random.key(1))
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)),
                                updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(same))


def test_real_init_follows_the_spec_initializers():
  logits = heads.Logits(21).init(jax.random.key(0), jnp.zeros((1, 5, 5, 256)))["params"]["semantic"]
  assert 0.007 < float(jnp.std(logits["kernel"])) < 0.0095  # truncated normal, stddev 0.01
  assert float(jnp.max(jnp.abs(logits["kernel"]))) <= 0.02 + 1e-6  # truncated at 2 stddev
  assert float(jnp.abs(logits["bias"]).max()) == 0.0
  sep = heads.conv3x3(256, 2, True, jnp.float32, "aspp1").init(
      jax.random.key(1), jnp.zeros((1, 5, 5, 512)), False)["params"]
  # Official split_separable_conv2d: depthwise stddev 0.33, pointwise 0.06 (truncation shrinks ~12%).
  assert 0.26 < float(jnp.std(sep["depthwise"]["kernel"])) < 0.31
  assert 0.048 < float(jnp.std(sep["pointwise"]["kernel"])) < 0.056
  assert float(jnp.std(sep["pointwise"]["bn"]["scale"])) == 0.0


def _loss_and_grads(model, variables, x):
  def loss(params):
    logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(0)})
    return jnp.mean(jnp.square(logits)), updates
  return jax.value_and_grad(loss, has_aux=True)(variables["params"])


def test_remat_keeps_parameters_values_and_gradients():
  x = jnp.asarray(np.random.default_rng(5).uniform(0, 255, (2, 33, 33, 3)), jnp.float32)
  plain = create_model(model_config(backbone="xception_41", depth_multiplier=0.25))
  remat = create_model(model_config(backbone="xception_41", depth_multiplier=0.25, remat=True))
  variables = random_variables(plain, x.shape)
  assert shapes(jax.eval_shape(remat.init, jax.random.key(0), x)) == shapes(variables)
  (loss, updates), grads = jax.jit(lambda v, x: _loss_and_grads(plain, v, x))(variables, x)
  (loss_r, updates_r), grads_r = jax.jit(lambda v, x: _loss_and_grads(remat, v, x))(variables, x)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  # Recomputation reorders float32 sums; a missing or stale activation would be off by O(1) x scale.
  assert_trees_close_at_scale((grads_r, updates_r), (grads, updates), rtol=1e-5)


@pytest.mark.parametrize("name", ["xception_41", "resnet_50", "mobilenet_v2"])
def test_remat_recomputes_every_backbone_units_activations(name):
  x = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  checkpoints = {}
  for remat in (False, True):
    model = create_model(model_config(backbone=name, depth_multiplier=0.25, remat=remat))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    program = jax.make_jaxpr(lambda v, x: _loss_and_grads(model, v, x))(variables, x)
    checkpoints[remat] = sum(e.primitive.name in ("checkpoint", "remat", "remat2")
                             for e in program.jaxpr.eqns)
  units = {"xception_41": 3 + 8 + 2, "resnet_50": 3 + 4 + 6 + 3, "mobilenet_v2": 17}[name]
  assert checkpoints == {False: 0, True: units}
