"""Train the original model from scratch on all 50,000 CIFAR-10 training images.

    python pretrain.py --arch resnet50            # -> model_weights/resnet50_original.pth
    python pretrain.py --arch vit --preset smoke  # tiny CPU check

The recipe per arch (optimizer, epochs, augmentation) is PRETRAIN_RECIPES in common.py.
"""
import common

if __name__ == "__main__":
    common.run_from_scratch("original", __doc__)
