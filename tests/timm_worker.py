"""A timm model with random weights and trained-looking BatchNorm, saved as safetensors and as a
torch.save state dict, and its eval-mode features on a random input (reference.npz).

Its own process: torch and TensorFlow in one process crash (both bring their own protobuf and
abseil), and the tests have TensorFlow loaded.

  python tests/timm_worker.py ARCH OUT_DIR
"""
import sys

import numpy as np
from safetensors.torch import save_file
import timm
import torch

# The modules whose outputs are our (final, low-level) features; our low-level points are SPEC
# sections 2-4 (MobileNetV2: slim's layer_4 = expanded_conv_2, its depthwise output after ReLU6,
# which timm's bn2 applies).
POINTS = {
    "xception41": (lambda m: m.blocks[-1], lambda m: m.blocks[1].stack.conv2),
    "xception65": (lambda m: m.blocks[-1], lambda m: m.blocks[1].stack.conv2),
    "xception71": (lambda m: m.blocks[-1], lambda m: m.blocks[2].stack.conv2),
    "resnet50": (lambda m: m.layer4, lambda m: m.layer1[2].bn3),
    "resnet101": (lambda m: m.layer4, lambda m: m.layer1[2].bn3),
    "mobilenetv2_050": (lambda m: m.blocks, lambda m: m.blocks[1][1].bn2),
    "mobilenetv2_100": (lambda m: m.blocks, lambda m: m.blocks[1][1].bn2),
}


def main(arch, out):
  torch.manual_seed(0)
  model = timm.create_model(arch, pretrained=False).eval()
  with torch.no_grad():  # so that a swapped or misplaced statistic would show
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, f"{out}/model.safetensors")
  torch.save(state, f"{out}/model.pth")
  seen = {}

  def keep(key):
    def hook(module, inputs, output):  # returns None: a returned value would replace the output
      seen[key] = output.clone()  # timm's next ReLU works in place on the low-level tensor
    return hook

  for key, point in zip(("final", "low_level"), POINTS[arch]):
    point(model).register_forward_hook(keep(key))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 65, 65, 3)).astype(np.float32)
  with torch.no_grad():
    model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.savez(f"{out}/reference.npz", x=x, **{k: v.numpy().transpose(0, 2, 3, 1) for k, v in seen.items()})


if __name__ == "__main__":
  main(*sys.argv[1:])
