"""LoRA: freeze the original model and train LoRA adapters (peft) on the retain set.

    python lora.py --arch resnet50   # -> model_weights/resnet50_lora.pth
"""
import common


def unlearn(model, ctx):
    return ctx.add_lora(model)


if __name__ == "__main__":
    common.run_method("lora", unlearn, __doc__, uses_lora=True)
