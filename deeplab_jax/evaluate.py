"""Mean IoU of a checkpoint on the validation split with the paper's inference strategies (Table 3).

  python -m deeplab_jax.evaluate --workdir=DIR [--step=N --scales=0.5,0.75,1.0,1.25,1.5,1.75 --flip \\
      --output_stride=8] [--config=configs/voc_xception.py --config.dataset.data_dir=OTHER]
  python -m deeplab_jax.evaluate --config=configs/voc_xception.py --config.dataset.data_dir=DATA \\
      --weights=deeplabv3_pascal_train_aug_2018_01_04.tar.gz --output_stride=8 --flip \\
      --scales=0.5,0.75,1.0,1.25,1.5,1.75

The workdir's own config.json (the run's data and model) unless --config is given, e.g. to point
at another data dir. With --weights (pretrained weights in any form `infer.Predictor.from_pretrained`
reads) the network comes from the weights and the data from --config; results are written only with
--output.

Each validation image is predicted at its own size by `infer.Predictor` (eval output stride,
multi-scale inputs, left-right flip, sliding window beyond the eval crop); the confusion matrix and
mean IoU use the training evaluation's metric code. Results go to DIR/eval/<step>_<strategy>.json.
"""
from __future__ import annotations

from deeplab_jax import allocator

if __name__ == "__main__":  # first, before jax and TensorFlow load: see allocator.py
  allocator.reexec_with_fast_allocator()

import json

from absl import app, flags, logging
from etils import epath
import jax
import numpy as np

from deeplab_jax import console, datasets, distributed, infer, input_pipeline, metrics, runtime


def strategy_name(predictor: infer.Predictor) -> str:
  scales = "+".join(f"{s:g}" for s in predictor.scales)
  return f"os{predictor.output_stride}_scales{scales}" + ("_flip" if predictor.flip else "")


def evaluate(config, workdir=None, step: int | None = None, *, predictor=None, log_dir=None,
             **options) -> dict:
  """{"mean_iou", "per_class_iou", "pixel_accuracy", "confusion_matrix", "step", "strategy"} over
  the config's eval split, of `predictor` or of the checkpoint in `workdir`; `options` go to
  `infer.Predictor` (scales, flip, output_stride). The log goes to `log_dir` (default WORKDIR/eval)."""
  if predictor is None:
    predictor = infer.Predictor.from_workdir(workdir, step, config=config, **options)
  builder = input_pipeline.load_builder(config)
  num_classes, ignore = int(config.dataset.num_classes), int(config.dataset.ignore_label)
  total = np.zeros((num_classes, num_classes), np.int64)
  count = 0
  examples = input_pipeline.as_numpy(input_pipeline.eval_examples(builder, config), builder,
                                     config.dataset.eval_split)
  log_dir = log_dir or (workdir and epath.Path(workdir) / "eval")
  if log_dir:
    console.open_log(log_dir, "evaluate.log")  # after the checks: a failed one writes nothing
  split = builder.info.splits.get(config.dataset.eval_split)  # None for a sliced split ("val[:8]")
  for example in console.bar(examples, split and -(-split.num_examples // jax.process_count()),
                             "evaluating", "image"):
    prediction = predictor.predict(example["image"])
    total += metrics.confusion_matrix_numpy(example["label"], prediction, num_classes, ignore)
    count += 1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
  results = metrics.metrics_from_confusion(total)
  names = datasets.class_names(config.dataset.name, num_classes, builder.info.metadata)
  results.update(step=predictor.step, strategy=strategy_name(predictor), images=count,
                 class_names=list(names), confusion_matrix=total)
  return results


def write_results(workdir, results: dict, split: str, folder=None) -> epath.Path:
  """WORKDIR/eval/<step>_<split>_<strategy>.json, or that name in `folder`."""
  folder = epath.Path(folder) if folder else epath.Path(workdir) / "eval"
  step = results["step"] if results["step"] is not None else "pretrained"
  path = folder / f"{step}_{split}_{results['strategy']}.json"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k != "confusion_matrix"}
    payload["confusion_matrix"] = np.asarray(results["confusion_matrix"]).tolist()
    path.write_text(json.dumps(payload, indent=2) + "\n")
  return path


def _define_flags():
  from ml_collections import config_flags
  infer.define_source_flags()
  config_flags.DEFINE_config_file("config", None, "Default: the workdir's config.json. With --weights, "
                                  "the data to evaluate on.")
  flags.DEFINE_string("output", None, "Folder for the results JSON and evaluate.log (default: "
                      "WORKDIR/eval; with --weights, nothing is written without it).")
  infer.define_strategy_flags()
  distributed.define_flags()


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  infer.check_source_flags(FLAGS)
  if FLAGS.weights and FLAGS.config is None:
    raise app.UsageError("--weights needs --config for the data to evaluate on, e.g. "
                         "--config=configs/voc_xception.py --config.dataset.data_dir=DATA")

  def run():
    console.setup(FLAGS.verbosity)  # details to WORKDIR/eval/evaluate.log; --verbosity=1: live
    distributed.initialize_from_flags()
    if FLAGS.config is not None:
      input_pipeline.load_builder(FLAGS.config)  # fills in what it leaves to the data (folder.py)
    predictor = infer.predictor_from_flags(FLAGS, config=FLAGS.config, **infer.strategy_options(FLAGS))
    config = predictor.config  # --config, or the workdir's config.json; the network from --weights
    results = evaluate(config, FLAGS.workdir, predictor=predictor, log_dir=FLAGS.output)
    path = None
    if FLAGS.workdir or FLAGS.output:
      path = write_results(FLAGS.workdir, results, config.dataset.eval_split, FLAGS.output)
    logging.info("per class: %s", dict(zip(results["class_names"], results["per_class_iou"])))
    return results, path

  results, path = runtime.run_command(run)
  source = f"step {results['step']}" if FLAGS.workdir else FLAGS.weights
  print(f"deeplab_jax: mean IoU {results['mean_iou']:.4f} ({results['strategy']}, {source}, "
        f"{results['images']} images" + (f"; {path})" if path else ")"))


if __name__ == "__main__":
  _define_flags()
  runtime.run_app(main)
