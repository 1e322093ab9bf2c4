"""Convert pretrained weights into an Orbax folder that `config.init_from.path` takes.

  python -m deeplab_jax.weights convert --from=timm --arch=xception65 --input=model.safetensors \
      --output=/tmp/xception65_imagenet
  python -m deeplab_jax.weights convert --from=tf_deeplab --input=DIR/model.ckpt --output=/tmp/voc

--input: a timm / torchvision file (safetensors or torch.save; torch is not needed) or a TF1
checkpoint prefix (model.ckpt for model.ckpt.index + .data-*); local or gs://. --arch is required for
timm and checked against the checkpoint for tf_deeplab. The last line is one JSON object.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from deeplab_jax import console, runtime

flags.DEFINE_enum("from", None, ["timm", "tf_deeplab"], "The source's format.")
flags.DEFINE_string("arch", None, "timm: xception41|65|71, resnet50|101, mobilenetv2_100 ...; "
                    "tf_deeplab: xception_65, resnet_v1_101_beta, mobilenet_v2 ... (optional)")
flags.DEFINE_string("input", None, "The file (timm) or checkpoint prefix (tf_deeplab).")
flags.DEFINE_string("output", None, "A new folder for the converted weights (local or gs://).")
FLAGS = flags.FLAGS


def main(argv):
  if argv[1:] != ["convert"]:
    raise app.UsageError("usage: python -m deeplab_jax.weights convert --from=timm|tf_deeplab "
                         "--arch=... --input=FILE --output=DIR")
  source_format = FLAGS["from"].value
  missing = [f"--{n}" for n, v in (("from", source_format), ("input", FLAGS.input),
                                    ("output", FLAGS.output)) if not v]
  if source_format == "timm" and not FLAGS.arch:
    missing.append("--arch")
  if missing:
    raise app.UsageError(f"convert needs {', '.join(missing)}")

  def run():
    from deeplab_jax.weights import convert
    console.setup(FLAGS.verbosity)  # details to OUTPUT/convert.log; --verbosity=1 shows them live
    convert.check_output(FLAGS.output)
    tree, info = convert.convert(source_format, FLAGS.arch, FLAGS.input)
    output = convert.save(FLAGS.output, tree, info)
    console.open_log(output, "convert.log")  # once the weights are whole: a failure writes nothing
    report = info["report"]
    logging.info("converted %s from %s; left out: %s", info["arch"], FLAGS.input, report["ignored"])
    head = info["head"]
    print(f"converted {report['tensors']} tensors ({report['trainable_values']:,} trainable values "
          f"and {report['values'] - report['trainable_values']:,} BatchNorm statistics) of "
          f"{info['arch']} into {info['backbone']}" + (" with its DeepLab head"
                                                        if head else " (backbone only)")
          + f"; nothing missing or unused; {len(report['ignored'])} classifier / training tensors "
          f"left out; wrote {output}")
    scope = "all" if head else "backbone"
    print(f"train from it with: --config.init_from.path={output} --config.init_from.scope={scope} "
          f"{convert.config_flags(info)}")
    print(json.dumps({"output": str(output), "backbone": info["backbone"], "head": head,
                      **{k: v for k, v in report.items() if k != "ignored"},
                      "ignored": len(report["ignored"])}))

  runtime.run_command(run, compile_cache=False)


if __name__ == "__main__":
  runtime.run_app(main)
