"""Retrain from scratch on the retain set only: the gold-standard unlearning baseline.

    python retrain.py --arch resnet50 --forget-class 3   # -> model_weights/resnet50_retrain.pth

Same recipe as pretrain.py (pretrain_recipe in unlearning/models.py), without the forgotten images.
"""
import common

if __name__ == "__main__":
    common.run_from_scratch("retrain", __doc__)
