"""Continual unlearning: forget one class per request, each step starting from the previous step's model.

    python continual.py --arch resnet50 --method loraprune --steps 3 5 7
    python continual.py --arch resnet50 --methods finetune loraprune salun scrub   # several methods, one plot
    python continual.py --arch resnet50 --track tensorboard   # each step a run: tensorboard --logdir runs
    python continual.py --arch resnet50 --compile   # every step's training compiled (torch.compile)

Step k runs the method's script (its command line, in this process; nothing is imported) with --weights = step
k-1's checkpoint (the original model at step 1) and --forget-class = every class forgotten so far, so the forget
set accumulates. After each step UA, RA, TA and MIA-efficacy are measured on everything forgotten so far, beside
the step's RTE; retrain.py on each step's retain set is the reference (--no-retrain skips it). Writes
results/continual_{arch}[-smoke][_{dataset}]_{methods}.json, .md and .png (the dataset named unless CIFAR-10);
step checkpoints go to model_weights/continual/.
"""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import common
from unlearning.runners import run_in_process

METHODS = ("finetune", "pruneft", "lora", "loraprune", "ga", "rl", "l1sparse", "salun", "scrub")
PLOTTED = {"UA": "UA (%)", "RA": "RA (%)", "TA": "TA (%)", "MIA_efficacy": "MIA-efficacy (%)", "RTE_s": "RTE (s)"}
COLUMNS = {"method": "method", "step": "step", "forget_classes": "forgotten classes", "forget_images": "forget images",
           "UA": "UA %", "RA": "RA %", "TA": "TA %", "MIA_efficacy": "MIA-efficacy %", "RTE_s": "RTE s"}


def run_name(args):
    """{arch}[-smoke][_{dataset}], as the checkpoints name them."""
    return common.weights_path(args.arch, "", args.preset, dataset=args.dataset).stem.removesuffix("_")


def step_checkpoint(args, method, step):
    return common.WEIGHTS_DIR / "continual" / f"{run_name(args)}_{method}_step{step}.pth"


def evaluate_step(path, method, step, forgotten, args, data_cache):
    """One table row: the metrics of a step's checkpoint on every class forgotten so far."""
    spec = common.ForgetSpec(tuple(forgotten))
    row = common.evaluate_checkpoint(path, args.data, args.device, spec, args.seed, data_cache,
                                     described={"dataset": args.dataset})
    data = data_cache[(args.data, args.preset, args.dataset)]
    splits = common.make_splits(data.train_labels, data.test_labels, spec)
    return {"method": method, "step": step, "forget_classes": list(forgotten), "forget_images": len(splits.forget_idx),
            "retain_images": len(splits.retain_idx),
            **{key: row.get(key) for key in (*common.METRIC_KEYS, "RTE_s", *common.COMPILE_META_KEYS)},
            "checkpoint": str(path)}


def run_step(script, argv, method, step, forgotten, args, data_cache):
    """Run one step's script and evaluate its checkpoint (argv ends with --out); under --track as one run named
    like the checkpoint, in the group of this continual run."""
    out = Path(argv[-1])
    settings = {"arch": args.arch, "dataset": args.dataset, "method": method, "step": step,
                "forget": common.ForgetSpec(tuple(forgotten)).tag, "seed": args.seed, "preset": args.preset,
                "continual_steps": args.steps}
    tracker = common.open_run(args, out.stem, settings, group=args.name)
    try:
        with common.activate(tracker):
            run_in_process(script, argv, hold_output=False)
        row = evaluate_step(out, method, step, forgotten, args, data_cache)
        tracker.log_final(row)
    finally:
        tracker.close()
    return row


def compile_flags(args):
    return ["--compile"] if args.compile else []


def run_method_steps(method, args, data_cache):
    """Apply the forget requests one after another with method; one row per step."""
    shared = ["--arch", args.arch, "--dataset", args.dataset, "--data", args.data, "--device", args.device,
              "--seed", args.seed, "--preset", args.preset, *compile_flags(args)]
    rows, weights = [], args.weights
    for step in range(1, len(args.steps) + 1):
        forgotten = sorted(args.steps[:step])
        out = step_checkpoint(args, method, step)
        argv = [*shared, "--weights", weights, "--forget-class", *forgotten, "--out", out]
        rows.append(run_step(f"{method}.py", argv, method, step, forgotten, args, data_cache))
        weights = out
    return rows


def run_retrain_steps(args, data_cache):
    """Retrain from scratch on each step's retain set: the reference every method is compared with."""
    rows = []
    for step in range(1, len(args.steps) + 1):
        forgotten = sorted(args.steps[:step])
        out = step_checkpoint(args, "retrain", step)
        argv = ["--arch", args.arch, "--dataset", args.dataset, "--data", args.data, "--device", args.device,
                "--seed", args.seed, "--preset", args.preset, *compile_flags(args), "--forget-class", *forgotten,
                "--out", out]
        rows.append(run_step("retrain.py", argv, "retrain", step, forgotten, args, data_cache))
    return rows


def plot(rows, steps, class_names, title, path):
    """One panel per metric, metric vs step, one line per method; drawn with the Agg backend."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure = Figure(figsize=(4 * len(PLOTTED), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PLOTTED))
    tick_labels = [f"{k}\n+{c} {class_names[c]}" for k, c in enumerate(steps, start=1)]
    for ax, (key, label) in zip(axes, PLOTTED.items(), strict=True):
        for method in methods:
            points = sorted((row["step"], row[key]) for row in rows if row["method"] == method)
            ax.plot(*zip(*points, strict=True), marker="o", label=method,
                    linestyle="--" if method == "retrain" else "-")
        ax.set_title(label.split(" (")[0])
        ax.set_xlabel("step (class forgotten)")
        ax.set_ylabel(label)
        ax.set_xticks(range(1, len(steps) + 1), tick_labels)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title)
    common.save_figure(path, figure, dpi=120)


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--method", "--methods", dest="methods", nargs="+", choices=METHODS, default=["loraprune"],
                        metavar="METHOD", help=f"unlearning method(s): {', '.join(METHODS)} (default: loraprune)")
    parser.add_argument("--steps", type=common.nonnegative_int, nargs="+", default=[3, 5, 7], metavar="C",
                        help="the class forgotten at each step, in order (default: 3 5 7)")
    parser.add_argument("--no-retrain", action="store_true", help="skip retraining from scratch at each step")
    parser.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="model (default: resnet50)")
    parser.add_argument("--weights", help="original model (default: model_weights/{arch}_original.pth)")
    common.add_dataset_arguments(parser)
    common.add_seed_argument(parser, "seed of every step and of the MIA")
    common.add_device_argument(parser)
    parser.add_argument("--preset", default="full", choices=common.PRESETS,
                        help="full: the paper's settings; smoke: a tiny CPU configuration (default: full)")
    common.add_compile_argument(parser)
    common.add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    common.check_tracking(args)
    num_classes = common.DATASETS[args.dataset].num_classes
    if len(set(args.steps)) != len(args.steps):
        raise common.UserError("--steps must name distinct classes")
    common.check_classes(common.ForgetSpec(tuple(args.steps)), args.dataset, "--steps")
    args.methods = list(dict.fromkeys(args.methods))
    args.weights = args.weights or str(common.weights_path(args.arch, "original", args.preset, dataset=args.dataset))
    args.name = f"continual_{run_name(args)}_{'-'.join(args.methods)}"
    out = common.RESULTS_DIR / args.name
    for path in (out.with_suffix(".json"), step_checkpoint(args, args.methods[0], 1)):
        common.check_writable(path, "output")
    data_cache = {}
    rows = [row for method in args.methods for row in run_method_steps(method, args, data_cache)]
    if not args.no_retrain:
        rows += run_retrain_steps(args, data_cache)
    common.write_json(out.with_suffix(".json"), {"arch": args.arch, "dataset": args.dataset, "preset": args.preset,
                                                 "num_classes": num_classes, "steps": args.steps,
                                                 "methods": args.methods, "seed": args.seed, "rows": rows})
    class_names = data_cache[(args.data, args.preset, args.dataset)].class_names
    table = [dict(row, forget_classes=", ".join(f"{c} ({class_names[c]})" for c in row["forget_classes"]))
             for row in rows]
    columns = common.with_compile_columns(COLUMNS, rows)
    common.write_text(out.with_suffix(".md"), common.markdown_table(table, columns) + "\n")
    title = f"Continual unlearning, {args.arch} on {args.dataset} ({args.preset} preset): metrics on every class " \
            f"forgotten so far"
    plot(rows, args.steps, class_names, title, out.with_suffix(".png"))
    print(common.markdown_table(table, columns))
    print(f"-> {out}.json, .md, .png")
    return rows


if __name__ == "__main__":
    common.cli(main)
