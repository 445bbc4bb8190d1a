"""l1-sparse: fine-tune on the retain set with an l1 penalty on the weights, its weight decaying linearly to 0.

    python l1sparse.py --arch resnet50   # -> model_weights/resnet50_l1sparse.pth

Unlearn-Sparse's FT_prune (optim/unlearn/FT.py): in epoch e the loss is CE + alpha * (1 - e / (E - no_l1)) * |w|_1
for e < E - no_l1 and plain CE after. Defaults: 10 epochs, lr 0.01, batch 256, SGD with momentum 0.9 and weight
decay 5e-4 (README.MD, arg_parser.py); alpha 1e-4 (the README section Baselines gives its source). The
penalty's gradient, its weight times sign(w), is added to the gradients after the backward pass of CE, in two
multi-tensor ops; it is the gradient autograd would give for the penalty.
"""
import common

RECIPE = {"epochs": 10, "lr": 0.01, "batch_size": 256}


def l1_weight(alpha, epoch, epochs, no_l1_epochs):
    """Unlearn-Sparse's schedule: linear decay over the first epochs - no_l1_epochs epochs, then 0."""
    decay_epochs = epochs - no_l1_epochs
    if decay_epochs <= 0:
        return alpha if decay_epochs == 0 else 0.0
    return alpha * (1 - epoch / decay_epochs) if epoch < decay_epochs else 0.0


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    args = ctx.args
    ctx.hyperparameters = {"l1_alpha": args.l1_alpha, "no_l1_epochs": args.no_l1_epochs, "optimizer": "sgd"}
    params = list(model.parameters())
    optimizer = common.make_sgd(params, ctx.lr)
    batches = ctx.retain_batches()
    for epoch in range(ctx.epochs):
        weight = l1_weight(args.l1_alpha, epoch, ctx.epochs, args.no_l1_epochs)

        def add_penalty_gradient(weight=weight):
            common.add_l1_gradient(params, weight)

        common.train(model, batches, 1, optimizer=optimizer, before_step=add_penalty_gradient,
                     desc=f"l1sparse epoch {epoch + 1}")
    return model


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE)
    parser.add_argument("--l1-alpha", type=common.nonnegative_float, default=common.L1_ALPHA,
                        help="initial weight of the l1 penalty (default: 1e-4)")
    parser.add_argument("--no-l1-epochs", type=common.nonnegative_int, default=0,
                        help="final epochs trained without the penalty (default: 0, as in Unlearn-Sparse)")


if __name__ == "__main__":
    common.run_method("l1sparse", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
