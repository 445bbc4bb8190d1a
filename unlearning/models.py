"""The two architectures for 32x32 inputs: ResNet-50 with a CIFAR stem and timm's ViT-S/4, plus slim smoke
variants with the same module names."""
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet, resnet50

from .errors import UserError
from .settings import ARCHS, IMAGE_SIZE, NUM_CLASSES, gpu_shaped


def _cifar_stem(model):
    """Replace ImageNet's 7x7 stride-2 conv and max-pool with a 3x3 stride-1 conv for 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SlimResNet(ResNet):
    """torchvision's ResNet with every stage 8x narrower: the smoke preset's stand-in for ResNet-50."""

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)


def build_model(arch, preset="full"):
    """A fresh model by name. The smoke preset gives a slim variant with the same module names."""
    if arch == "resnet50":
        if preset == "smoke":
            model = SlimResNet(Bottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES)
            model.fc = nn.Linear(model.inplanes, NUM_CLASSES)
        else:
            model = resnet50(num_classes=NUM_CLASSES)
        return _cifar_stem(model)
    if arch == "vit":
        from timm.models.vision_transformer import VisionTransformer  # imported here: seconds, and only ViT needs it

        size = {"embed_dim": 48, "depth": 2, "num_heads": 2} if preset == "smoke" else \
            {"embed_dim": 384, "depth": 12, "num_heads": 6}
        return VisionTransformer(img_size=IMAGE_SIZE, patch_size=4, num_classes=NUM_CLASSES, global_pool="avg",
                                 class_token=False, **size)
    raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


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
