"""GA: gradient ascent on the forget set, i.e. SGD on its negated cross-entropy (5 epochs, lr 1e-4, batch 256).

    python ga.py --arch resnet50   # -> model_weights/resnet50_ga.pth

Defaults from Unlearn-Sparse (README.MD and arg_parser.py): SGD, momentum 0.9, weight decay 5e-4.
"""
import common

RECIPE = {"epochs": 5, "lr": 1e-4, "batch_size": 256}


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    return common.train(model, ctx.forget_batches(), ctx.epochs, loss_fn=common.negated_cross_entropy,
                        optimizer=common.make_sgd(model.parameters(), ctx.lr), desc="ga")


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE)


if __name__ == "__main__":
    common.run_method("ga", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
