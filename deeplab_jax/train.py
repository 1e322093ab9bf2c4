"""Training and evaluation: one jitted step over the device mesh, Orbax checkpoints, exact resume.

`train_and_evaluate(config, workdir)` is the whole job. Starting it in a workdir that holds a checkpoint
resumes from the latest one (parameters, optimizer, step and input position); a finished run only
re-evaluates. The step functions are pure: (state, batch) -> (state, metrics).
"""
from __future__ import annotations

import errno
import functools
import itertools
import json
import math
import os
from typing import Any

from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
import flax
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import optax
from PIL import Image

from deeplab_jax import (checkpoints, console, curves, datasets, distributed, input_pipeline, losses, metrics, optim,
                         sharding, sliding_window, visualize)
from deeplab_jax import config as config_lib
from deeplab_jax.errors import NonFiniteLossError, Preempted
from deeplab_jax.models import create_model, upsample_logits
from deeplab_jax.weights import init_from

# Params are the same at any size; a small input keeps the init program small.
_INIT_SIZE = 65


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def learning_rate_schedule(config) -> optax.Schedule:
  o = config.optim
  return optim.poly_schedule(o.base_lr, config.train.steps, o.lr_power, o.warmup_steps)


def create_tx(config) -> optax.GradientTransformation:
  o = config.optim
  return optim.create_optimizer(learning_rate_schedule(config), name=o.optimizer, momentum=o.momentum,
                                weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm or None)


def init_state(rng, *, model, tx) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def model_for_mesh(config, mesh, output_stride: int | None = None):
  """`config`'s model for the devices of `mesh`: their platform and number pick the formulations, so
  the programs compiled ahead of time for a TPU slice (deeplab_jax.aot) are the ones it would run."""
  return create_model(config, output_stride, platform=mesh.devices.flat[0].platform,
                      num_devices=mesh.size)


def abstract_state(config) -> TrainState:
  """Shapes and dtypes of `config`'s train state (what a checkpoint of it holds), without computing."""
  init_fn = functools.partial(init_state, model=create_model(config), tx=create_tx(config))
  return jax.eval_shape(init_fn, jax.random.key(0))


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, loss_config, ignore_label: int,
               dropout_rng) -> tuple[TrainState, dict]:
  """One SGD step on the global batch. A non-finite loss or gradient leaves the state unchanged and is
  reported in `metrics["nonfinite"]`, so no NaN ever reaches a checkpoint."""
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats"],
                                  rngs={"dropout": rng})
    loss = losses.segmentation_loss(
        logits, batch["label"], step=state.step, ignore_label=ignore_label,
        class_weights=loss_config.class_weights, top_k_percent=loss_config.top_k_percent,
        hard_mining_steps=loss_config.hard_mining_steps)
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(operands):
    grads, params, opt_state, new_stats, _ = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats

  def keep(operands):
    _, params, opt_state, _, old_stats = operands
    return params, opt_state, old_stats

  # A branch rather than an elementwise select between the new and the old state: the select read
  # the whole state twice more and cost about 0.1 s of a 1.5 s step (Xception-65, 257x257, batch 2,
  # 2-core CPU); the branch cost 0.02-0.04 s over no guard at all (benchmarks/README.md).
  params, opt_state, batch_stats = lax.cond(
      finite, update, keep, (grads, state.params, state.opt_state, batch_stats, state.batch_stats))
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                     "nonfinite": (~finite).astype(jnp.int32)}


def sharded_init(config, model, tx, mesh, rng):
  """(abstract state, its shardings over `mesh`, a jitted init that creates it on them): the state's
  layout is decided from shapes alone, before anything is computed (or restored into it)."""
  init_fn = functools.partial(init_state, model=model, tx=tx)
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.param_sharding,
                                       int(config.mesh.fsdp_min_size))
  return abstract, shardings, jax.jit(init_fn, out_shardings=shardings)


def jit_train_step(config, model, tx, mesh, state_sh, dropout_rng):
  """The train step jitted over `mesh`: the state keeps its shardings and is donated, the batch is
  split over the data axis, the metrics are replicated. Training and the benchmarks run this."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=learning_rate_schedule(config),
                           loss_config=config.loss, ignore_label=int(config.dataset.ignore_label),
                           dropout_rng=dropout_rng)
  return jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(config, mesh, state_sh):
  """The eval step jitted over `mesh` at the eval output stride: parameters keep their training
  shardings, the padded batch is split over the data axis, the confusion matrix and the go-on flag
  are replicated and the logits stay split. Training's evaluation and deeplab_jax.aot run this."""
  model = model_for_mesh(config, mesh, config.eval.output_stride)  # None: the training stride
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(
      functools.partial(eval_step, model=model, num_classes=int(config.dataset.num_classes),
                        ignore_label=int(config.dataset.ignore_label)),
      in_shardings=(state_sh.params, state_sh.batch_stats, batch_sh),
      out_shardings=(sharding.replicated(mesh), batch_sh, sharding.replicated(mesh)))


def eval_step(params, batch_stats, batch: dict, *, model, num_classes: int, ignore_label: int):
  """(confusion matrix of the batch's whole images, float32 logits of every row at the crop's size,
  whether any process has another batch). Filler rows, window rows and ignored pixels are not
  counted here: the host counts an image assembled from windows once its windows are averaged."""
  logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
  logits = upsample_logits(logits, batch["label"].shape[1:3])
  predictions = jnp.argmax(logits, axis=-1)
  cm = metrics.confusion_matrix(batch["label"], predictions, num_classes, mask=batch["mask"],
                                ignore_label=ignore_label)
  return cm, logits, jnp.any(batch["more"])


class Evaluator:
  """Runs the validation split through a jitted eval step. Whole images are counted on device, in
  int32 confusion matrices moved to an int64 host total before they could overflow (Cityscapes has
  1e9 pixels); images larger than the eval crop come as sliding windows whose logits the host
  averages (`sliding_window`, as `infer.Predictor` tiles) and counts. Every process steps until none
  has a batch left, so processes with more or larger images than others need no count agreed ahead."""

  def __init__(self, config, builder, mesh, state_shardings):
    self.config, self.builder, self.mesh = config, builder, mesh
    self.num_classes = int(config.dataset.num_classes)
    self.ignore_label = int(config.dataset.ignore_label)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.step_fn = distributed.first_run_together(jit_eval_step(config, mesh, state_shardings),
                                                  "the eval step")
    crop = tuple(int(v) for v in config.eval.crop_size)
    pixels = int(config.eval.batch_size) * crop[0] * crop[1]
    self.flush_every = max(1, (2**31 - 1) // pixels)
    self.class_names = datasets.class_names(config.dataset.name, self.num_classes,
                                            builder.info.metadata)

  def __call__(self, state: TrainState) -> tuple[dict, list[np.ndarray]]:
    device_total = np.zeros((self.num_classes, self.num_classes), np.int64)
    host_total = np.zeros_like(device_total)  # this process's images assembled from windows
    running, images, averages = None, [], {}
    several = jax.process_count() > 1
    batches = input_pipeline.eval_batches(self.builder, self.config)
    for i in itertools.count():
      local, windows = next(batches, (None, None))
      if local is None:  # this process is done; another is not (or its shard is empty)
        local = input_pipeline.filler_batch(self.config)
        windows = [None] * len(local["mask"])
      cm, logits, more = self.step_fn(state.params, state.batch_stats,
                                      sharding.to_global(local, self.batch_sharding))
      running = cm if running is None else running + cm
      if (i + 1) % self.flush_every == 0:
        device_total += np.asarray(running, np.int64)
        running = None
      host_total += self._on_host(local, windows, logits, images, averages)
      # One process knows only its own batches; the step's flag says whether any has another.
      if not (bool(more) if several else local["more"].any()):
        break
    if running is not None:
      device_total += np.asarray(running, np.int64)
    if several:
      from jax.experimental import multihost_utils
      host_total = np.asarray(multihost_utils.process_allgather(host_total)).sum(0)
    total = device_total + host_total
    return metrics.metrics_from_confusion(total) | {"confusion_matrix": total}, images

  def _on_host(self, local: dict, windows: list, logits, images: list, averages: dict) -> np.ndarray:
    """One batch's host work: its windows' logits added to their images' averages, the confusion
    matrix of the images whose last window this was, and summaries until there are enough. Logits
    leave the devices only for a batch that holds windows or a wanted summary."""
    cm = np.zeros((self.num_classes, self.num_classes), np.int64)
    wanted = int(self.config.eval.num_summary_images)
    if not (any(w is not None for w in windows) or (len(images) < wanted and local["mask"].any())):
      return cm
    rows = sharding.local_rows(logits)
    for k, window in enumerate(windows):
      if window is None:
        if local["mask"][k] and len(images) < wanted:
          images.append(self._summary(local["image"][k], local["label"][k], rows[k].argmax(-1)))
        continue
      average = averages.setdefault(window.index, sliding_window.Average(*window.label.shape,
                                                                         self.num_classes))
      average.add(window.top, window.left, rows[k, :window.height, :window.width])
      if window.last:
        prediction = averages.pop(window.index).result().argmax(-1)
        cm += metrics.confusion_matrix_numpy(window.label, prediction, self.num_classes,
                                             self.ignore_label)
        if len(images) < wanted:
          images.append(self._summary(window.image, window.label, prediction))
    return cm

  def _summary(self, image, label, prediction) -> np.ndarray:
    """Input | ground truth | prediction, side by side, cut to the labelled image. An image larger
    than the eval crop (assembled from windows) is shrunk to it, nearest pixel: a 4000x3000 photo
    would otherwise put 36 MB into every evaluation's summaries."""
    longest, limit = max(label.shape), max(int(v) for v in self.config.eval.crop_size)
    if longest > limit:
      rows, cols = (np.arange(round(d * limit / longest)) * longest // limit for d in label.shape)
      image, label, prediction = (x[rows][:, cols] for x in (image, label, prediction))
    image = np.clip(image, 0, 255).astype(np.uint8)
    row = np.concatenate([image, visualize.colorize(label), visualize.colorize(prediction)], axis=1)
    return visualize.crop_to_labeled(row, label, self.ignore_label)


EXAMPLES_NAME = "examples.png"


def _scalars(prefix: str, results: dict, class_names) -> dict:
  out = {f"{prefix}/mean_iou": results["mean_iou"], f"{prefix}/pixel_accuracy": results["pixel_accuracy"]}
  for name, iou in zip(class_names, results["per_class_iou"]):
    out[f"{prefix}/iou/{name}"] = iou
  return out


def _write_final(workdir: epath.Path, step: int, results: dict, class_names) -> None:
  clean = lambda v: None if v is None or math.isnan(v) else round(float(v), 6)
  payload = {"step": int(step), "mean_iou": clean(results["mean_iou"]),
             "pixel_accuracy": clean(results["pixel_accuracy"]),
             "per_class_iou": {n: clean(v) for n, v in zip(class_names, results["per_class_iou"])}}
  (workdir / "final_metrics.json").write_text(json.dumps(payload, indent=2) + "\n")


def _write_config(workdir: epath.Path, config) -> None:
  """The config beside the checkpoints, for inference and for reading what a run did."""
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def _check_finite(pending: list, step: int, manager) -> None:
  """Raise if any step since the last check had a non-finite loss (a host sync; done rarely)."""
  if pending and int(np.sum(jax.device_get([m["nonfinite"] for m in pending]))):
    manager.wait_until_finished()
    raise NonFiniteLossError(
        f"the loss became NaN or infinite before step {step}; training stopped and the last checkpoint "
        f"(step {manager.latest_step()}) is intact: lower config.optim.base_lr, set "
        f"config.optim.grad_clip_norm, or check the input data")


def _header(config, builder, mesh, abstract_state, workdir, log_path, start_step: int,
            resumed_from) -> None:
  """The console's first lines: what trains, on what, where its files and log go, from where."""
  params = sum(int(x.size) for x in jax.tree.leaves(abstract_state.params))
  train_images = builder.info.splits[config.dataset.train_split].num_examples
  devices = jax.devices()
  mesh_shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
  total = int(config.train.steps)
  console.say(f"DeepLabv3+ {config.model.backbone}: {console.count(params)} parameters, output stride "
              f"{config.model.output_stride}, {config.dataset.num_classes} classes; "
              f"{config.dataset.name}: {train_images:,} training images")
  console.say(f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''} "
              f"(mesh {mesh_shape}{f', {jax.process_count()} processes' if jax.process_count() > 1 else ''}), "
              f"global batch {config.train.batch_size}, {total:,} steps; workdir {workdir}"
              + (f" (full log: {log_path})" if log_path else ""))
  window_line = _sliding_window_line(config, builder)
  if window_line:
    console.say(window_line)
  if resumed_from is not None:
    console.say(f"resumed from {resumed_from}")
  elif config.init_from.path is not None:
    console.say(f"a new model from the pretrained weights {config.init_from.path}")
  if start_step >= total:
    console.say(f"all {total:,} steps are done: evaluating only")


def _sliding_window_line(config, builder) -> str | None:
  """Where the prepared data stores its largest validation image (folder data) and that exceeds the
  eval crop: how those images will be evaluated, said before the first step."""
  split = config.dataset.eval_split
  largest = dict((builder.info.metadata or {}).get("largest_image") or {}).get(split)
  crop = tuple(int(v) for v in config.eval.crop_size)
  if not largest or input_pipeline.runs_whole(largest, crop):
    return None
  step = input_pipeline.eval_window_stride(config)
  return (f"evaluation: {split} images up to {largest[0]}x{largest[1]}; those larger than the "
          f"{crop[0]}x{crop[1]} eval crop go through a sliding window of that size, stride "
          f"{step[0]}x{step[1]}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train `config.train.steps` steps (resuming from `workdir`), evaluate, write final_metrics.json."""
  config_lib.validate_training(config)
  workdir = epath.Path(workdir)
  is_chief = jax.process_index() == 0
  if is_chief and workdir.exists() and not workdir.is_dir():  # before building any data
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(workdir))
  mesh = sharding.create_mesh()
  sharding.check_batch(int(config.train.batch_size), mesh, "config.train.batch_size")
  sharding.check_batch(int(config.eval.batch_size), mesh, "config.eval.batch_size")
  builder = input_pipeline.load_builder(config)  # data errors before any compile or write
  input_pipeline.check_split(builder, config.dataset.train_split, "config.dataset.train_split")
  input_pipeline.check_split(builder, config.dataset.eval_split, "config.dataset.eval_split")

  model = model_for_mesh(config, mesh)
  tx = create_tx(config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(int(config.seed)))
  abstract_state, state_sh, init = sharded_init(config, model, tx, mesh, init_rng)

  # Pretrained weights are read and matched before any compile, and in a fresh workdir before
  # anything is written; a workdir that has checkpoints resumes instead.
  prepare = functools.partial(init_from.prepare, config, {"params": abstract_state.params,
                                                          "batch_stats": abstract_state.batch_stats})
  wants_weights = config.init_from.path is not None
  pretrained = prepare() if wants_weights and not (workdir / "checkpoints").exists() else None
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
  manager = checkpoints.create_manager(workdir, keep=int(config.checkpoint.keep),
                                       async_save=bool(config.checkpoint.async_save))
  # The newest checkpoint that reads back intact; damaged newer ones are named and moved aside.
  restored = checkpoints.restore_newest(manager, sharding.with_shardings(abstract_state, state_sh),
                                        move_aside=True)
  if restored is None and wants_weights and pretrained is None:
    pretrained = prepare()
  log_path = console.open_log(workdir)  # after the checks that change nothing when they fail
  resumed_from = None if restored is None else manager.directory / str(restored.step)
  if restored is None:
    state = init(init_rng)
    logging.info("initialized a new %s DeepLab", config.model.backbone)
    if pretrained is not None:
      state = init_from.apply(state, pretrained[0])
  else:
    state = restored.state
    logging.info("resumed from %s", resumed_from)
  start_step, total_steps = int(jax.device_get(state.step)), int(config.train.steps)
  _header(config, builder, mesh, abstract_state, workdir, log_path, start_step, resumed_from)
  if is_chief:
    _write_config(workdir, config)
  if pretrained is not None:
    init_from.write_report(pretrained[1], workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})
  evaluator = Evaluator(config, builder, mesh, state_sh)
  class_names = evaluator.class_names

  examples = []

  def run_eval(step: int) -> dict:
    results, images = evaluator(state)
    console.say(console.eval_line(step, results, class_names))
    writer.write_scalars(step, _scalars("eval", results, class_names))
    if images:
      writer.write_images(step, {f"eval/example_{k}": im[None] for k, im in enumerate(images)})
    examples[:] = images
    return results

  preemption = distributed.Preemption()
  bar = None
  try:
    if start_step < total_steps:
      batch_sh = sharding.batch_sharding(mesh)
      step_fn = distributed.first_run_together(
          jit_train_step(config, model, tx, mesh, state_sh, dropout_rng), "the train step")
      batches = input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config, start_step),
                                        builder, config.dataset.train_split)
      report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                               every_steps=int(config.train.log_every_steps))
      logging.info("training steps %d..%d", start_step + 1, total_steps)
      console.say(f"training steps {start_step + 1:,}..{total_steps:,} (the first compiles the step)")
      bar = console.Progress(start_step + 1, total_steps, int(config.train.batch_size))
      pending, loss = [], None
      for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, step_metrics = step_fn(state, sharding.to_global(next(batches), batch_sh))
        pending.append(step_metrics)
        report(step)
        last = step == total_steps
        if step % config.train.log_every_steps == 0 or last:
          _check_finite(pending, step, manager)
          fetched = jax.device_get(pending)
          means = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm",
                                                                        "learning_rate")}
          writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
          pending, loss = [], means["loss"]
        bar.update(step, loss)
        # Every process checks every step: over several processes they agree on one step here.
        preempted = preemption.reached(step) and not last
        if step % config.checkpoint.every_steps == 0 or last or preempted:
          _check_finite(pending, step, manager)
          checkpoints.save(manager, step, state)
        if preempted:
          manager.wait_until_finished()
          raise Preempted(f"preempted (SIGTERM) at step {step}: saved a checkpoint there; run the same "
                          f"command to resume from it")
        if step % config.eval.every_steps == 0 and not last:
          with report.timed("eval"):
            run_eval(step)
    final_step = int(jax.device_get(state.step))
    results = run_eval(final_step)
  finally:
    if bar is not None:
      bar.close()
    try:
      preemption.close()
      manager.wait_until_finished()  # raises if a save failed: the summaries are written anyway
      checkpoints.record_sizes(manager)
    finally:
      writer.flush()
  if is_chief:
    _write_final(workdir, final_step, results, class_names)
    curves.write(workdir, total_steps)
    if examples:  # the final evaluation's first images: input | truth | prediction
      with (workdir / EXAMPLES_NAME).open("wb") as f:
        Image.fromarray(visualize.stack(examples)).save(f, format="PNG")
  logging.info("final: %s", {k: v for k, v in results.items() if k != "confusion_matrix"})
  if is_chief:
    print(f"deeplab_jax: final mean IoU {results['mean_iou']:.4f} at step {final_step} "
          f"(pixel accuracy {results['pixel_accuracy']:.4f}; {workdir / 'final_metrics.json'})",
          flush=True)
  return results
