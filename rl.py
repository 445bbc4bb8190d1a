"""RL: random labels: train on the forget set relabelled at random (never its true label), then on the retain set.

    python rl.py --arch resnet50   # -> model_weights/resnet50_rl.pth

Each epoch first passes over the forget set with fresh random labels, then over the retain set, as SalUn's
unlearn/RL.py does for CIFAR-10. Defaults are SalUn's CIFAR-10 command for random forgetting without the saliency
mask (10 epochs, lr 0.013, batch 256, SGD with momentum 0.9 and weight decay 5e-4); SalUn publishes no class-wise
command, so the same settings serve every forget setting.
"""
import common

RECIPE = {"epochs": 10, "lr": 0.013, "batch_size": 256}


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    batches = common.RandomLabelBatches(ctx.forget_batches(), ctx.retain_batches(), seed=ctx.args.seed)
    return common.train(model, batches, ctx.epochs, optimizer=common.make_sgd(model.parameters(), ctx.lr), desc="rl")


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE)


if __name__ == "__main__":
    common.run_method("rl", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
