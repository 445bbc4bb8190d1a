"""SalUn: mask the weights most salient to the forget loss, then random-label unlearning that moves only those.

    python salun.py --arch resnet50   # -> model_weights/resnet50_salun.pth

Saliency = |gradient of the forget set's cross-entropy| summed over its batches (eval mode, original weights);
the mask keeps the --saliency-share of all weights with the largest saliency, across the whole model, as in
SalUn's generate_mask.py. Training is rl.py's (forget set relabelled at random, then the retain set) with the
gradient outside the mask zeroed. Defaults: SalUn's CIFAR-10 command (10 epochs, lr 0.013, batch 256, mask share
0.5; SGD with momentum 0.9 and weight decay 5e-4). Weight decay is added to the gradient before masking, so
masked-in weights see exactly SGD's weight decay and masked-out weights never move.
"""
import torch

import common

RECIPE = {"epochs": 10, "lr": 0.013, "batch_size": 256}


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    share = ctx.args.saliency_share
    params = dict(model.named_parameters())
    mask = common.saliency_mask(model, ctx.forget_batches(), share)
    frozen = {name: params[name].detach()[~keep].clone() for name, keep in mask.items()}
    weight_decay = common.BASELINE_SGD["weight_decay"]

    def masked_gradient():
        with torch.no_grad():
            for name, keep in mask.items():
                param = params[name]
                if param.grad is not None:
                    param.grad.add_(param, alpha=weight_decay).mul_(keep)

    optimizer = common.make_sgd(model.parameters(), ctx.lr, weight_decay=0.0)
    batches = common.RandomLabelBatches(ctx.forget_batches(), ctx.retain_batches(), seed=ctx.args.seed)
    common.train(model, batches, ctx.epochs, optimizer=optimizer, before_step=masked_gradient, desc="salun")
    moved = [name for name, keep in mask.items() if not torch.equal(params[name].detach()[~keep], frozen[name])]
    if moved:
        raise RuntimeError(f"weights outside the saliency mask moved: {moved[:3]}")
    ctx.hyperparameters = {"saliency_share": share, "masked_weights": int(sum(k.sum() for k in mask.values())),
                           "weights": sum(k.numel() for k in mask.values()), "optimizer": "sgd"}
    return model


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE)
    parser.add_argument("--saliency-share", type=common.unit_interval_open_below, default=0.5,
                        help="share of all weights that training may change (default: 0.5)")


if __name__ == "__main__":
    common.run_method("salun", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
