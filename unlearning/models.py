"""The architectures, one row each in ARCHITECTURES: how a model is built (full size and the smoke preset's slim
variant with the same module names), whose definition it follows, where it is pruned, where LoRA goes and how it is
trained from scratch. ResNet-18, ResNet-50 and VGG-16-BN for small images (32x32, or 64x64 for Tiny ImageNet), and
timm's ViT-S with 64 patch tokens (ViT-S/4 at 32x32, patch 8 at 64x64).

    model = build_model("resnet18", "smoke", num_classes=10, image_size=32)
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50

from .errors import UserError
from .settings import gpu_shaped

VIT_TOKENS_PER_SIDE = 8  # 64 patch tokens at every image size


def _cifar_stem(model):
    """Replace ImageNet's 7x7 stride-2 conv and max-pool with a 3x3 stride-1 conv for 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SlimResNet(ResNet):
    """torchvision's ResNet with every stage 8x narrower: the smoke preset's stand-in for ResNet-18 and -50."""

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)


def slim_resnet(block, num_classes):
    """SlimResNet with one block per stage and a classifier sized to its narrower last stage."""
    model = SlimResNet(block, [1, 1, 1, 1], num_classes=num_classes)
    model.fc = nn.Linear(model.inplanes, num_classes)
    return model


def resnet50_cifar(num_classes=10, image_size=32):
    return _cifar_stem(resnet50(num_classes=num_classes))


def resnet50_smoke(num_classes=10, image_size=32):
    return _cifar_stem(slim_resnet(Bottleneck, num_classes))


def resnet18_cifar(num_classes=10, image_size=32):
    return _cifar_stem(resnet18(num_classes=num_classes))


def resnet18_smoke(num_classes=10, image_size=32):
    return _cifar_stem(slim_resnet(BasicBlock, num_classes))


# VGG-16's configuration "D": output channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm as OPTML-Group's Unlearn-Sparse and SalUn build it for CIFAR (models/VGG.py): bias-free
    3x3 convs, each followed by BatchNorm and ReLU, five max-pools, a 2x2 adaptive average pool and a
    2048-256-256-classes classifier; their weight initialisation. The input normalisation they put inside the
    model is left out (the data pipeline normalises). width_divisor narrows every layer (the smoke preset)."""

    def __init__(self, layers=VGG16_LAYERS, num_classes=10, width_divisor=1):
        super().__init__()
        modules, channels = [], 3
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = layer // width_divisor
                modules += [nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(width),
                            nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*modules)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        hidden = 256 // width_divisor
        self.classifier = nn.Sequential(nn.Linear(channels * 2 * 2, hidden), nn.ReLU(True), nn.Linear(hidden, hidden),
                                        nn.ReLU(True), nn.Linear(hidden, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.constant_(module.bias, 0)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def get_classifier(self):
        """The final linear layer (the name timm's models use)."""
        return self.classifier[-1]


def vgg_conv_names(layers=VGG16_LAYERS):
    """Module names of VGG's convolutions in `features` (each conv is followed by its BatchNorm and ReLU)."""
    names, index = [], 0
    for layer in layers:
        if layer != "M":
            names.append(f"features.{index}")
        index += 1 if layer == "M" else 3
    return names


def vgg16_bn_cifar(num_classes=10, image_size=32):
    return VGG(VGG16_LAYERS, num_classes)


def vgg16_bn_smoke(num_classes=10, image_size=32):
    return VGG(VGG16_LAYERS, num_classes, width_divisor=8)


def _vit(num_classes, image_size, **size):
    from timm.models.vision_transformer import VisionTransformer  # imported here: seconds, and only ViT needs it

    return VisionTransformer(img_size=image_size, patch_size=image_size // VIT_TOKENS_PER_SIDE, num_classes=num_classes,
                             global_pool="avg", class_token=False, **size)


def vit_s4(num_classes=10, image_size=32):
    return _vit(num_classes, image_size, embed_dim=384, depth=12, num_heads=6)


def vit_smoke(num_classes=10, image_size=32):
    return _vit(num_classes, image_size, embed_dim=48, depth=2, num_heads=2)


def every_conv(model):
    """Every convolution, the stem's and the shortcuts' included."""
    return [module for module in model.modules() if isinstance(module, nn.Conv2d)]


def mlp_hidden_layers(model):
    """Every transformer block's first MLP layer (its outputs are the MLP's hidden units)."""
    return [block.mlp.fc1 for block in model.blocks]


def position_embedding(model):
    """The ViT's position embedding, a parameter outside any layer, pruned along its embedding dimension (2)."""
    return [(model.pos_embed, 2)]


@dataclass(frozen=True)
class Architecture:
    """One row of ARCHITECTURES: everything that differs between the models."""
    build: Callable        # (num_classes, image_size) -> the full-size model
    build_smoke: Callable  # the same for the smoke preset's slim variant, with the same module names
    definition: str        # whose definition the model follows
    prune_targets: Callable  # model -> layers whose output channels/features are pruned (mask and physical)
    lora: dict             # LoRA defaults: rank, alpha, dropout, target-module regex, modules trained in full
    recipe: dict           # from-scratch recipe of pretrain.py and retrain.py (train_from_scratch's keys)
    recipe_source: str     # where the recipe comes from and how far it has been checked
    unwrapped_parameters: Callable | None = None  # model -> [(parameter, pruned dim)] torch-pruning must also cut


# The from-scratch recipe of OPTML-Group's Unlearn-Sparse (main_imp.py:74-99 with arg_parser.py:67-76's defaults) and
# SalUn (Classification/main_train.py:59-84, Classification/arg_parser.py:69-78): SGD (momentum 0.9, no Nesterov),
# lr 0.1, weight decay 5e-4, batch 256, 182 epochs, lr x0.1 after epochs 91 and 136, crop + flip.
UNLEARN_SPARSE_RECIPE = {"epochs": 182, "lr": 0.1, "batch_size": 256, "optimizer": "sgd", "weight_decay": 5e-4,
                         "label_smoothing": 0.0, "nesterov": False, "lr_milestones": [0.5, 0.75]}
UNLEARN_SPARSE_SOURCE = ("OPTML-Group Unlearn-Sparse, main_imp.py with arg_parser.py's defaults (SalUn's "
                         "Classification/main_train.py and arg_parser.py have the same); not yet sized on a GPU")
CNN_LORA = {"rank": 8, "alpha": 16, "dropout": 0.1}

ARCHITECTURES = {
    "resnet18": Architecture(
        build=resnet18_cifar, build_smoke=resnet18_smoke,
        definition="torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool), the model of "
                   "OPTML-Group Unlearn-Sparse and SalUn (models/ResNet.py, imagenet=False) and of kuangliu's "
                   "pytorch-cifar",
        prune_targets=every_conv,
        lora={**CNN_LORA, "targets": r"layer\d\.\d+\.conv[12]", "train_full": ["fc"]},
        recipe=UNLEARN_SPARSE_RECIPE, recipe_source=UNLEARN_SPARSE_SOURCE),
    "resnet50": Architecture(
        build=resnet50_cifar, build_smoke=resnet50_smoke,
        definition="torchvision's ResNet-50 with the CIFAR stem (3x3 stride-1 conv1, no max-pool)",
        prune_targets=every_conv,
        lora={**CNN_LORA, "targets": r"layer\d\.\d+\.conv[123]", "train_full": ["fc"]},
        recipe={"epochs": 60, "lr": 0.2, "batch_size": 512, "optimizer": "sgd", "weight_decay": 5e-4,
                "label_smoothing": 0.1, "warmup_fraction": 0.15},
        recipe_source="this project's one-cycle recipe, aimed at >= 95 % test accuracy; not yet sized on a GPU"),
    "vgg16_bn": Architecture(
        build=vgg16_bn_cifar, build_smoke=vgg16_bn_smoke,
        definition="VGG-16 with BatchNorm as OPTML-Group Unlearn-Sparse and SalUn build it for CIFAR "
                   "(models/VGG.py: configuration D, 2x2 average pool, 2048-256-256-classes classifier)",
        prune_targets=every_conv,
        lora={**CNN_LORA, "targets": "|".join(name.replace(".", r"\.") for name in vgg_conv_names()),
              "train_full": ["classifier"]},
        recipe=UNLEARN_SPARSE_RECIPE, recipe_source=UNLEARN_SPARSE_SOURCE),
    "vit": Architecture(
        build=vit_s4, build_smoke=vit_smoke,
        definition="timm's VisionTransformer, ViT-S with 64 patches (patch 4 at 32x32): dim 384, depth 12, 6 heads, "
                   "average pooling, no class token",
        prune_targets=mlp_hidden_layers,
        lora={"rank": 16, "alpha": 32, "dropout": 0.1, "targets": r"blocks\.{last}\.attn\.proj|head",
              "train_full": []},
        recipe={"epochs": 200, "lr": 1e-3, "batch_size": 512, "optimizer": "adamw", "weight_decay": 0.05,
                "label_smoothing": 0.1, "warmup_fraction": 0.05},
        recipe_source="this project's one-cycle recipe, aimed at >= 85 % test accuracy; not yet sized on a GPU",
        unwrapped_parameters=position_embedding),
}
ARCHS = tuple(ARCHITECTURES)
PAPER_ARCHS = ("resnet50", "vit")  # the PruneLoRA paper's two models: the sweep's and the timing bench's default
PRETRAIN_RECIPES = {name: arch.recipe for name, arch in ARCHITECTURES.items()}
LORA_DEFAULTS = {name: arch.lora for name, arch in ARCHITECTURES.items()}
# Changes to an arch's recipe for one (arch, dataset); a pair not listed trains with the arch's recipe. None is sized
# on a GPU yet. ResNet-18 and VGG-16-BN follow Unlearn-Sparse and SalUn, which train every dataset with one set of
# flags (their arg_parser.py has no per-dataset value; utils.py's setup_model_dataset sets only the classes, the
# normalisation and the loaders) and augment as their dataset.py does: CIFAR-100 and Tiny ImageNet with crop (padding
# 4) + flip, as CIFAR-10 (Unlearn-Sparse dataset.py:202-203 and 387-388), SVHN not at all (dataset.py:85-89, the
# training transform of svhn_dataloaders is ToTensor alone; SalUn's Classification/dataset.py:85-89 the same).
# ResNet-50 and ViT keep this project's recipes on every dataset; on SVHN half the epochs, as its 73,257 training
# images are 1.5 times CIFAR's and digits are learnt faster, and crops without flips (datasets.py): this project's
# choice, first guesses to be checked against the accuracy curve pretrain.py records.
PRETRAIN_DATASET_CHANGES = {
    ("resnet18", "svhn"): {"augment": False},
    ("vgg16_bn", "svhn"): {"augment": False},
    ("resnet50", "svhn"): {"epochs": 30},
    ("vit", "svhn"): {"epochs": 100},
}


def pretrain_recipe(arch, dataset):
    """The from-scratch recipe of arch on dataset: PRETRAIN_RECIPES[arch] with PRETRAIN_DATASET_CHANGES applied."""
    return {**PRETRAIN_RECIPES[arch], **PRETRAIN_DATASET_CHANGES.get((arch, dataset), {})}


def build_model(arch, preset="full", num_classes=10, image_size=32):
    """A fresh model by name, for num_classes classes and square images of image_size pixels (the dataset's). The
    smoke preset gives a slim variant with the same module names. The model carries its arch's name (model.arch),
    which architecture() reads, and its image size (model.image_size, see input_size)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    row = ARCHITECTURES[arch]
    model = (row.build_smoke if preset == "smoke" else row.build)(num_classes, image_size)
    model.arch = arch
    model.image_size = image_size
    return model


def input_size(model):
    """The side of the images model was built for (build_model's image_size; 32, CIFAR's, for other models)."""
    return getattr(model, "image_size", 32)


def architecture(model):
    """The ARCHITECTURES row of a model build_model made (a peft-wrapped one included)."""
    arch = getattr(model, "arch", None)
    if arch not in ARCHITECTURES:
        raise UserError(f"a {type(model).__name__} that build_model did not make: its arch is unknown")
    return ARCHITECTURES[arch]


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
