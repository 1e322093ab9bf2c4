"""Pretrained weights: timm / torchvision ImageNet backbones and official TF DeepLab checkpoints
converted into this project's parameter tree (`convert`), and `config.init_from` (`init_from`).

  python -m deeplab_jax.weights convert --from=timm --arch=xception65 --input=FILE --output=DIR
"""
