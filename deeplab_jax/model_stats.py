"""Print a config's parameter and MAC counts per part (backbone, ASPP, decoder, logits).

  python -m deeplab_jax.model_stats --config=configs/voc_xception.py --size=513

Any `--config.*` override applies. The last line is one JSON object: params, batch_stats, gmacs.
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from deeplab_jax import runtime
from deeplab_jax.models.complexity import format_table, model_stats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_SIZE = flags.DEFINE_integer("size", 513, "Square input size for the MAC count.")


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/voc_xception.py")
  stats = runtime.run_command(lambda: model_stats(config, _SIZE.value), compile_cache=False)
  m = config.model
  print(f"{m.backbone}, OS{m.output_stride}, decoder={m.use_decoder}, "
        f"aspp_separable={m.aspp_separable}, decoder_separable={m.decoder_separable}, "
        f"{config.dataset.num_classes} classes, {_SIZE.value}x{_SIZE.value} input")
  print(format_table(stats))
  print(json.dumps({"params": stats["params"], "batch_stats": stats["batch_stats"],
                    "gmacs": round(stats["gmacs"], 4)}))


if __name__ == "__main__":
  runtime.run_app(main)
