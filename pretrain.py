"""Train the original model from scratch on every training image of --dataset (default: CIFAR-10's 50,000).

    python pretrain.py --arch resnet50            # -> model_weights/resnet50_original.pth
    python pretrain.py --arch vit --preset smoke  # tiny CPU check
    python pretrain.py --arch vit --mixup 0.8 --cutmix 1.0 --compile  # optional recipe keys, see README

The recipe per arch (optimizer, epochs, augmentation) is its row of the arch table in unlearning/models.py
(pretrain_recipe(arch, dataset): the arch's recipe with its dataset's changes).
"""
import common

if __name__ == "__main__":
    common.run_from_scratch("original", __doc__)
