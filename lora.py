"""LoRA: freeze the original model and train LoRA adapters (peft) on the retain set.

    python lora.py --arch resnet50   # -> model_weights/resnet50_lora.pth

The weights stay frozen, but BatchNorm layers run in train mode, so their running statistics move to the
retain set's (the paper's behaviour); --bn frozen keeps them in eval mode with the original statistics.
"""
import common


def unlearn(model, ctx):
    return ctx.add_lora(model)


if __name__ == "__main__":
    common.run_method("lora", unlearn, __doc__, add_arguments=common.add_batchnorm_argument, uses_lora=True)
