"""SalUn: mask the weights most salient to the forget loss, then random-label unlearning that moves only those.

    python salun.py --arch resnet50   # -> model_weights/resnet50_salun.pth
    python salun.py --arch resnet50 --saliency stepped   # the saliency of a version of generate_mask.py

Saliency = |gradient of the forget set's cross-entropy| summed over its batches, in eval mode, at the original
weights as in the SalUn paper (--saliency stepped: with an SGD step after every forget batch, as a version of
SalUn's generate_mask.py does). The mask keeps the --saliency-share of all weights with the largest saliency,
across the whole model. Training is rl.py's (forget set relabelled at random, then the retain set) with the
gradient outside the mask zeroed. Defaults: SalUn's CIFAR-10 command for random forgetting (10 epochs, lr 0.013,
batch 256, mask share 0.5; SGD with momentum 0.9 and weight decay 5e-4), used for every forget setting since no
class-wise command is published. Weight decay is added to the gradient before masking, so masked-in weights see
exactly SGD's weight decay and masked-out weights never move, as in SalUn's current unlearn/RL.py.
"""
import torch

import common

RECIPE = {"epochs": 10, "lr": 0.013, "batch_size": 256}
# generate_mask.py's SGD lr is --unlearn_lr, which SalUn's mask command leaves at arg_parser.py's default.
SALIENCY_STEP_LR = 0.01


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    share = ctx.args.saliency_share
    params = dict(model.named_parameters())
    step_lr = SALIENCY_STEP_LR if ctx.args.saliency == "stepped" else None
    mask = common.saliency_mask(model, ctx.forget_batches(), share, step_lr)
    frozen = {name: params[name].detach()[~keep].clone() for name, keep in mask.items()}
    masked_gradient = common.masked_gradient(params, mask, common.BASELINE_SGD["weight_decay"])
    optimizer = common.make_sgd(model.parameters(), ctx.lr, weight_decay=0.0)
    batches = common.RandomLabelBatches(ctx.forget_batches(), ctx.retain_batches(), seed=ctx.args.seed)
    common.train(model, batches, ctx.epochs, optimizer=optimizer, before_step=masked_gradient, desc="salun")
    moved = [name for name, keep in mask.items() if not torch.equal(params[name].detach()[~keep], frozen[name])]
    if moved:
        raise RuntimeError(f"weights outside the saliency mask moved: {moved[:3]}")
    ctx.hyperparameters = {"saliency": ctx.args.saliency, "saliency_share": share,
                           "masked_weights": int(sum(k.sum() for k in mask.values())),
                           "weights": sum(k.numel() for k in mask.values()), "optimizer": "sgd"}
    if step_lr is not None:
        ctx.hyperparameters["saliency_step_lr"] = step_lr
    return model


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE)
    parser.add_argument("--saliency-share", type=common.unit_interval_open_below, default=common.SALIENCY_SHARE,
                        help="share of all weights that training may change (default: 0.5)")
    parser.add_argument("--saliency", default="paper", choices=("paper", "stepped"),
                        help="paper: every forget gradient at the original weights, as in the SalUn paper; stepped: "
                             "an SGD step (lr 0.01) on the forget loss after every forget batch while the gradients "
                             "are summed, as a version of SalUn's generate_mask.py does (default: paper)")


if __name__ == "__main__":
    common.run_method("salun", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
