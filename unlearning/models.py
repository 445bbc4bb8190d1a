"""The two architectures for small images (32x32, or 64x64 for Tiny ImageNet): ResNet-50 with a CIFAR stem and
timm's ViT-S with 64 patch tokens (ViT-S/4 at 32x32, patch 8 at 64x64), plus slim smoke variants with the same
module names."""
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet, resnet50

from .errors import UserError
from .settings import ARCHS, gpu_shaped

VIT_TOKENS_PER_SIDE = 8  # 64 patch tokens at every image size


def _cifar_stem(model):
    """Replace ImageNet's 7x7 stride-2 conv and max-pool with a 3x3 stride-1 conv for 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SlimResNet(ResNet):
    """torchvision's ResNet with every stage 8x narrower: the smoke preset's stand-in for ResNet-50."""

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)


def build_model(arch, preset="full", num_classes=10, image_size=32):
    """A fresh model by name for num_classes classes of image_size x image_size images (the dataset's); its
    image_size attribute records the latter (see input_size). The smoke preset gives a slim variant with the same
    module names."""
    if arch == "resnet50":
        if preset == "smoke":
            model = SlimResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes)
            model.fc = nn.Linear(model.inplanes, num_classes)
        else:
            model = resnet50(num_classes=num_classes)
        model = _cifar_stem(model)
    elif arch == "vit":
        from timm.models.vision_transformer import VisionTransformer  # imported here: seconds, and only ViT needs it

        size = {"embed_dim": 48, "depth": 2, "num_heads": 2} if preset == "smoke" else \
            {"embed_dim": 384, "depth": 12, "num_heads": 6}
        model = VisionTransformer(img_size=image_size, patch_size=image_size // VIT_TOKENS_PER_SIDE,
                                  num_classes=num_classes, global_pool="avg", class_token=False, **size)
    else:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    model.image_size = image_size
    return model


def input_size(model):
    """The side of the images model was built for (build_model's image_size; 32, CIFAR's, for other models)."""
    return getattr(model, "image_size", 32)


def to_device(model, device):
    """model on device, with channels-last weights on GPU to match normalize()'s channels-last batches."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if gpu_shaped(device) else model


def is_channels_last(model):
    """Whether model's convolution weights are channels-last (as to_device leaves them on the GPU's path)."""
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def keep_layout(model, channels_last):
    """model back in channels-last after something made new, contiguous weights (torch-pruning, peft), if its
    weights were channels-last before (is_channels_last)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
