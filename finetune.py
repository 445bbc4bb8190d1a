"""Fine-tune: train the whole original model on the retain set (Adam 1e-3, 5 epochs, batch 128).

    python finetune.py --arch resnet50   # -> model_weights/resnet50_finetune.pth
"""
import common


def unlearn(model, ctx):
    return model


if __name__ == "__main__":
    common.run_method("finetune", unlearn, __doc__)
