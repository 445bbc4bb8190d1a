"""SCRUB: the original model is a frozen teacher; alternate max-steps that push the student's outputs on the forget
set away from the teacher's with min-steps that keep them close on the retain set while fitting its labels.

    python scrub.py --arch resnet50   # -> model_weights/resnet50_scrub.pth

Each epoch e = 1..E: if e <= msteps, one pass over the forget set minimising -KL(teacher || student); then one
pass over the retain set minimising gamma * CE + alpha * KL (KL at temperature T, times T^2). Defaults: the
CIFAR-10 cell of SCRUB's large_scale_unlearning.ipynb: 3 epochs, lr 5e-4, retain batch 256, forget batch 512,
msteps 2, T 4, gamma 0.99, alpha 0.001, SGD with momentum 0.9 and weight decay 5e-4, lr x0.1 after epochs 3, 5, 9.
"""
import common

RECIPE = {"epochs": 3, "lr": 5e-4, "batch_size": 256}


def unlearn(model, ctx):
    return model


def fit(model, ctx):
    args, teacher = ctx.args, ctx.original.eval().requires_grad_(False)
    ctx.hyperparameters = {name: getattr(args, name) for name in
                           ("msteps", "kd_temperature", "kd_gamma", "kd_alpha", "forget_batch_size", "lr_decay_epochs")}
    ctx.hyperparameters["optimizer"] = "sgd"

    away_from_teacher = common.away_from_teacher(teacher, args.kd_temperature)
    close_to_teacher = common.close_to_teacher(teacher, args.kd_temperature, args.kd_gamma, args.kd_alpha)
    optimizer = common.make_sgd(model.parameters(), ctx.lr)
    forget, retain = ctx.forget_batches(args.forget_batch_size), ctx.retain_batches()
    for epoch in range(1, ctx.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = ctx.lr * 0.1 ** sum(epoch > milestone for milestone in args.lr_decay_epochs)
        if epoch <= args.msteps:
            common.train(model, forget, 1, loss_fn=away_from_teacher, optimizer=optimizer, desc=f"scrub max {epoch}")
        common.train(model, retain, 1, loss_fn=close_to_teacher, optimizer=optimizer, desc=f"scrub min {epoch}")
    return model


def add_arguments(parser):
    parser.set_defaults(recipe=RECIPE, needs_original=True)
    distillation = common.SCRUB_DISTILLATION
    parser.add_argument("--msteps", type=common.nonnegative_int, default=2,
                        help="epochs that start with a max-step (default: 2)")
    parser.add_argument("--kd-temperature", type=common.positive_float, default=distillation["kd_temperature"],
                        help="distillation temperature (default: 4)")
    parser.add_argument("--kd-gamma", type=common.nonnegative_float, default=distillation["kd_gamma"],
                        help="weight of the retain CE (default: 0.99)")
    parser.add_argument("--kd-alpha", type=common.nonnegative_float, default=distillation["kd_alpha"],
                        help="weight of the retain KL (default: 0.001)")
    parser.add_argument("--forget-batch-size", type=common.positive_int, default=512,
                        help="batch size of max-steps (default: 512)")
    parser.add_argument("--lr-decay-epochs", type=common.positive_int, nargs="*", default=[3, 5, 9],
                        help="epochs after which the lr is multiplied by 0.1 (default: 3 5 9)")


if __name__ == "__main__":
    common.run_method("scrub", unlearn, __doc__, add_arguments=add_arguments, fit=fit)
