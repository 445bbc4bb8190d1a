"""Prune + fine-tune: prune half of the channels by L2 norm, then train the whole model on the retain set.

    python pruneft.py --arch resnet50   # -> model_weights/resnet50_pruneft.pth
"""
import common


def unlearn(model, ctx):
    return ctx.prune(model)


if __name__ == "__main__":
    common.run_method("pruneft", unlearn, __doc__, prunes=True)
