"""The config schema every `configs/*.py` starts from, and its validation.

Configs override a few fields of `default_config()`; `validate` turns a wrong value into a one-line
`ConfigError` that names the field and the fix.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from deeplab_jax.errors import ConfigError

BACKBONE_NAMES = ("xception_41", "xception_65", "xception_71", "resnet_50_beta", "resnet_101_beta",
                  "resnet_50", "resnet_101", "mobilenet_v2")
OUTPUT_STRIDES = (8, 16, 32)
DTYPES = ("float32", "bfloat16")
DEPTHWISE_IMPLS = ("auto", "grouped", "shift", "native")
STRIDED_PADDINGS = ("fixed", "same")
PARAM_SHARDINGS = ("replicated", "fsdp")
OPTIMIZERS = ("sgd", "adam")
INIT_FORMATS = ("orbax", "timm", "tf_deeplab")
INIT_SCOPES = ("backbone", "all")
# ASPP rates at output stride 16 (SPEC section 5); other strides scale them by 16 / OS.
ATROUS_RATES_AT_OS16 = (6, 12, 18)


def default_config() -> ml_collections.ConfigDict:
  """The SPEC section 8 recipe (VOC, Xception-65, OS16); configs override a few fields."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbone = "xception_65"
  config.model.output_stride = 16
  config.model.multi_grid = (1, 1, 1)
  # Rates at `output_stride`; None derives them: (6, 12, 18) at OS16, (12, 24, 36) at OS8, (3, 6, 9)
  # at OS32. An empty tuple keeps only the image-pooling and 1x1 branches (official MobileNetV2 head).
  config.model.atrous_rates = config_dict.placeholder(tuple)
  config.model.use_decoder = True
  config.model.aspp_separable = True
  config.model.decoder_separable = True
  config.model.depth_multiplier = 1.0
  # "bfloat16": bfloat16 compute, float32 parameters, BatchNorm statistics, loss and logits. Predicted
  # 1.6x faster on a v5e (X-65 513x513: 23.7 -> 14.8 GB moved per image, benchmarks/README.md), but
  # float32 stays the default until a full training run shows bfloat16 reaching the paper's figures.
  config.model.dtype = "float32"
  config.model.freeze_bn = False  # True: BN uses moving statistics (small global batches)
  config.model.depthwise_impl = "auto"  # "grouped" (reference), "shift", "native"; "auto": per backend
  # Recompute each backbone unit's activations in the backward pass instead of storing them, for
  # batches or crops that do not fit otherwise. Predicted for a v5e (X-65 513x513, bfloat16, 4 per
  # chip): temporaries 3.95 -> 1.40 GiB per chip for 29% more FLOPs and 22% more of the compiler's
  # cycles; on XLA:CPU it saved no memory and cost 26% of the step (benchmarks/README.md). Off.
  config.model.remat = False
  # BatchNorm moving-average decay for every layer; None keeps each network's own (0.9997 Xception,
  # MobileNetV2 and heads; 0.95 ResNet), which suits long fine-tuning runs.
  config.model.bn_momentum = config_dict.placeholder(float)
  # How strided convs pad: "fixed", the official fixed_padding rule (Xception, ResNet, timm's and
  # PyTorch's weights); "same", TF SAME (official TF MobileNetV2 weights, ImageNet and model zoo:
  # 0 before and 1 after a 3x3 stride-2 conv on an even size). Converted weights record which.
  config.model.strided_padding = "fixed"

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "voc2012_segmentation"  # a TFDS name; see deeplab_jax.datasets
  config.dataset.data_dir = config_dict.placeholder(str)  # TFDS data dir (local or gs://); None: default
  # None in any of these four (configs/folder.py): what the prepared data stores (its class count and
  # ignore label; its "train" split, and "val", "validation" or "test"), filled in when it is loaded.
  config.dataset.train_split = "train_aug"
  config.dataset.eval_split = "val"
  config.dataset.num_classes = 21
  config.dataset.ignore_label = 255

  config.input = ml_collections.ConfigDict()
  config.input.crop_size = (513, 513)
  config.input.min_scale = 0.5
  config.input.max_scale = 2.0
  config.input.scale_step = 0.25
  config.input.flip = True
  # The official `resize_to_range` before augmentation and evaluation (ADE20K: 513, 513, 16): the
  # shorter side to min_resize_value unless the longer would exceed max_resize_value, then each side
  # up to a multiple of resize_factor plus one. None: images keep their size (VOC, Cityscapes).
  config.input.min_resize_value = config_dict.placeholder(int)
  config.input.max_resize_value = config_dict.placeholder(int)
  config.input.resize_factor = config_dict.placeholder(int)
  config.input.shuffle_buffer = 4096  # encoded examples per process
  config.input.cache = False  # keep encoded examples in memory (small data sets)
  # True: leave out examples whose stored image or mask does not decode, after one pass that decodes
  # the whole split at start-up (logged with their names and count). False: such an example stops
  # training with a line naming it.
  config.input.skip_undecodable = False

  config.train = ml_collections.ConfigDict()
  config.train.steps = 30_000
  config.train.batch_size = 16  # global, over all processes and devices
  config.train.log_every_steps = 100

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "sgd"  # "sgd" (SPEC) | "adam" (AdamW: momentum is beta1, decay decoupled)
  config.optim.base_lr = 0.007
  config.optim.lr_power = 0.9
  config.optim.momentum = 0.9
  config.optim.weight_decay = 4e-5  # L2 wd * |w|^2 / 2 on conv kernels; 1e-4 for ResNet
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0  # 0: no clipping

  config.loss = ml_collections.ConfigDict()
  config.loss.class_weights = config_dict.placeholder(tuple)  # None: all 1
  config.loss.top_k_percent = 100.0  # hard-pixel mining keeps the top k% pixel losses
  config.loss.hard_mining_steps = 0  # ramp from 100% to top_k_percent over this many steps

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 5000
  config.eval.batch_size = 8  # global
  # Images up to this size are padded to it and run whole, as SPEC section 8 evaluates (VOC, Cityscapes
  # and ADE20K always fit their configs' crops). Larger ones, which the official evaluation refuses
  # (own photos), go through a sliding window of this size instead (deeplab_jax.sliding_window,
  # mmsegmentation's "slide" mode), neighbouring windows sharing `window_overlap` of it: a stride of
  # 342 at 513, the 341 of slide mode's 512 window.
  config.eval.crop_size = (513, 513)
  config.eval.window_overlap = 1 / 3
  config.eval.output_stride = config_dict.placeholder(int)  # None: the training output stride
  config.eval.num_summary_images = 4

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True

  config.mesh = ml_collections.ConfigDict()
  # All devices form one `data` axis. "fsdp" also shards large parameters and optimizer state over it.
  config.mesh.param_sharding = "replicated"
  config.mesh.fsdp_min_size = 2**18  # parameters smaller than this stay replicated under "fsdp"

  # Pretrained weights for a run that starts with no checkpoint in its workdir (resume always wins):
  # `path` is a folder written by `python -m deeplab_jax.weights convert`, a training workdir, or with
  # format "timm" / "tf_deeplab" the original file (docs/weights.md). scope "backbone"
  # loads an ImageNet backbone and leaves the heads at their init; "all" loads a whole DeepLab (logits
  # of another class count stay at their init).
  config.init_from = ml_collections.ConfigDict()
  config.init_from.path = config_dict.placeholder(str)  # None: train from scratch
  config.init_from.format = "orbax"  # "orbax" | "timm" | "tf_deeplab"
  config.init_from.scope = "backbone"  # "backbone" | "all"
  return config


def atrous_rates(model_config, output_stride: int | None = None) -> tuple[int, ...]:
  """ASPP rates for `output_stride` (default: the config's own), scaling configured rates by OS."""
  train_os = model_config.output_stride
  output_stride = output_stride or train_os
  if model_config.atrous_rates is None:
    base, base_os = ATROUS_RATES_AT_OS16, 16
  else:
    base, base_os = tuple(model_config.atrous_rates), train_os
  rates = []
  for r in base:
    scaled = r * base_os / output_stride
    if scaled != int(scaled) or scaled < 1:
      raise ConfigError(f"config.model.atrous_rates={tuple(base)} at output stride {base_os} do not "
                        f"scale to whole rates at output stride {output_stride}; set rates that do")
    rates.append(int(scaled))
  return tuple(rates)


def _pair(value, field: str) -> tuple[int, int]:
  value = tuple(value)
  if len(value) != 2 or any(int(v) < 1 for v in value):
    raise ConfigError(f"{field}={value} must be (height, width) with positive sizes, e.g. (513, 513)")
  return int(value[0]), int(value[1])


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError on the first value that cannot work."""
  m = config.model
  if m.backbone not in BACKBONE_NAMES:
    raise ConfigError(f"config.model.backbone={m.backbone!r} is not a backbone; choose one of "
                      f"{', '.join(BACKBONE_NAMES)}")
  if m.output_stride not in OUTPUT_STRIDES:
    raise ConfigError(f"config.model.output_stride={m.output_stride} is not supported; use 8, 16 or 32")
  if len(tuple(m.multi_grid)) != 3 or any(int(r) < 1 for r in m.multi_grid):
    raise ConfigError(f"config.model.multi_grid={tuple(m.multi_grid)} must be 3 positive rates, "
                      f"e.g. (1, 2, 4)")
  if m.atrous_rates is not None and any(int(r) < 1 for r in m.atrous_rates):
    raise ConfigError(f"config.model.atrous_rates={tuple(m.atrous_rates)} must be positive integers")
  if m.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={m.dtype!r} is not supported; use 'float32' or 'bfloat16'")
  if not m.depth_multiplier > 0:
    raise ConfigError(f"config.model.depth_multiplier={m.depth_multiplier} must be > 0 (1.0 = paper)")
  if m.get("depthwise_impl", "auto") not in DEPTHWISE_IMPLS:
    raise ConfigError(f"config.model.depthwise_impl={m.depthwise_impl!r}: choose one of "
                      f"{', '.join(DEPTHWISE_IMPLS)}")
  if m.get("strided_padding", "fixed") not in STRIDED_PADDINGS:
    raise ConfigError(f"config.model.strided_padding={m.strided_padding!r}: choose one of "
                      f"{', '.join(STRIDED_PADDINGS)} (official TF MobileNetV2 weights: same)")
  if m.get("bn_momentum") is not None and not 0 <= m.bn_momentum < 1:
    raise ConfigError(f"config.model.bn_momentum={m.bn_momentum} must be in [0, 1) or None")
  if config.dataset.num_classes is not None and int(config.dataset.num_classes) < 1:
    raise ConfigError(f"config.dataset.num_classes={config.dataset.num_classes} must be >= 1 (or None: "
                      f"the data's own count)")


def check_ignore_label(dataset) -> None:
  """The ignore label lies above the class ids and fits uint8 labels (None: the data's, not yet read)."""
  ignore, count = dataset.ignore_label, dataset.num_classes
  if ignore is not None and (not 0 <= int(ignore) <= 255 or int(ignore) < int(count or 0)):
    raise ConfigError(f"config.dataset.ignore_label={ignore} must be in [num_classes, 255] (labels are "
                      f"uint8; num_classes={count}); DeepLab uses 255")


def validate_training(config: ml_collections.ConfigDict) -> None:
  """`validate` plus the input, optimizer, loss, eval, checkpoint and mesh fields."""
  validate(config)
  # None: what the prepared data stores (input_pipeline.resolve_from_data fills them in).
  n_classes = None if config.dataset.num_classes is None else int(config.dataset.num_classes)
  check_ignore_label(config.dataset)
  _pair(config.input.crop_size, "config.input.crop_size")
  _pair(config.eval.crop_size, "config.eval.crop_size")
  i = config.input
  if not 0 < i.min_scale <= i.max_scale or i.scale_step <= 0:
    raise ConfigError(f"config.input scales min={i.min_scale}, max={i.max_scale}, step={i.scale_step} "
                      f"need 0 < min_scale <= max_scale and scale_step > 0 (paper: 0.5, 2.0, 0.25)")
  sizes = {k: i.get(k) for k in ("min_resize_value", "max_resize_value", "resize_factor")}
  if any(v is not None and int(v) < 1 for v in sizes.values()) or (
      sizes["min_resize_value"] is None and any(v is not None for v in sizes.values())):
    raise ConfigError(f"config.input resize values {sizes} must be positive, and max_resize_value and "
                      f"resize_factor need min_resize_value (ADE20K: 513, 513, 16; None: no resize)")
  t, o = config.train, config.optim
  for field, value in (("config.train.steps", t.steps), ("config.train.batch_size", t.batch_size),
                       ("config.eval.batch_size", config.eval.batch_size),
                       ("config.train.log_every_steps", t.log_every_steps),
                       ("config.eval.every_steps", config.eval.every_steps),
                       ("config.checkpoint.every_steps", config.checkpoint.every_steps),
                       ("config.checkpoint.keep", config.checkpoint.keep),
                       ("config.input.shuffle_buffer", i.shuffle_buffer)):
    if int(value) < 1:
      raise ConfigError(f"{field}={value} must be a positive integer")
  if o.optimizer not in OPTIMIZERS:
    raise ConfigError(f"config.optim.optimizer={o.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
  if not o.base_lr > 0:
    raise ConfigError(f"config.optim.base_lr={o.base_lr} must be > 0 (paper: 0.007)")
  if not 0 <= o.warmup_steps < t.steps:
    raise ConfigError(f"config.optim.warmup_steps={o.warmup_steps} must be in [0, config.train.steps="
                      f"{t.steps})")
  if o.weight_decay < 0 or o.grad_clip_norm < 0 or not 0 <= o.momentum < 1:
    raise ConfigError(f"config.optim needs weight_decay >= 0, grad_clip_norm >= 0 (0 = off) and "
                      f"0 <= momentum < 1; got {o.weight_decay}, {o.grad_clip_norm}, {o.momentum}")
  loss = config.loss
  if not 0 < loss.top_k_percent <= 100:
    raise ConfigError(f"config.loss.top_k_percent={loss.top_k_percent} must be in (0, 100]")
  if loss.class_weights is not None and n_classes and len(tuple(loss.class_weights)) != n_classes:
    raise ConfigError(f"config.loss.class_weights has {len(tuple(loss.class_weights))} entries but "
                      f"config.dataset.num_classes={n_classes}; give one weight per class")
  if not 0 <= float(config.eval.get("window_overlap", 0)) < 1:
    raise ConfigError(f"config.eval.window_overlap={config.eval.window_overlap} must be in [0, 1): the "
                      f"share of a sliding window that the next one overlaps (mmsegmentation: 1/3)")
  eval_os = config.eval.output_stride
  if eval_os is not None and eval_os not in OUTPUT_STRIDES:
    raise ConfigError(f"config.eval.output_stride={eval_os} is not supported; use 8, 16, 32 or None")
  atrous_rates(config.model)  # the rates must scale to whole rates at both strides
  atrous_rates(config.model, eval_os)
  for field, crop, stride in (("config.input.crop_size", config.input.crop_size,
                               config.model.output_stride),
                              ("config.eval.crop_size", config.eval.crop_size,
                               eval_os or config.model.output_stride)):
    if min(_pair(crop, field)) < stride + 1:
      raise ConfigError(f"{field}={tuple(crop)} is too small for output stride {stride}: each side "
                        f"needs at least {stride + 1} pixels (a 2x2 feature map); the paper uses 513")
  init = config.get("init_from")
  if init is not None and init.get("path") is not None:
    if init.format not in INIT_FORMATS:
      raise ConfigError(f"config.init_from.format={init.format!r}: choose one of "
                        f"{', '.join(INIT_FORMATS)}")
    if init.scope not in INIT_SCOPES:
      raise ConfigError(f"config.init_from.scope={init.scope!r}: choose one of {', '.join(INIT_SCOPES)}")
    if init.format == "timm" and init.scope == "all":
      raise ConfigError("config.init_from.scope='all' with format 'timm': timm files hold an ImageNet "
                        "backbone only; set config.init_from.scope=backbone")
  if config.mesh.param_sharding not in PARAM_SHARDINGS:
    raise ConfigError(f"config.mesh.param_sharding={config.mesh.param_sharding!r}: choose one of "
                      f"{', '.join(PARAM_SHARDINGS)}")
