"""PruneLoRA: prune half of the channels by L2 norm, then train LoRA adapters on the retain set.

    python loraprune.py --arch resnet50   # -> model_weights/resnet50_loraprune.pth

As in lora.py, BatchNorm running statistics move to the retain set's unless --bn frozen is given.
"""
import common


def unlearn(model, ctx):
    ctx.prune(model)
    return ctx.add_lora(model)


if __name__ == "__main__":
    common.run_method("loraprune", unlearn, __doc__, add_arguments=common.add_batchnorm_argument, prunes=True,
                      uses_lora=True)
