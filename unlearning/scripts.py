"""The command-line runner and the two script shapes: run_method (load the original, unlearn, fit, save) for the
unlearning scripts, run_from_scratch for pretrain.py and retrain.py."""
import argparse
import contextlib
import copy
import datetime
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import LoraSettings, add_lora, finalize, import_peft, lora_settings
from .arguments import (
    add_common_arguments,
    add_method_arguments,
    add_pretrain_option_arguments,
    check_out_path,
    make_parser,
    nonnegative_int,
    with_overrides,
)
from .checkpoints import device_name, library_versions, load_checkpoint, name_settings, save_checkpoint, weights_path
from .compiling import compiling
from .data import Batches, Data, data_label, load_data, normalize
from .datasets import DATASETS, DEFAULT_DATASET
from .errors import Terminated, UserError, raise_terminated
from .files import written
from .forget import ForgetSpec, Splits, check_splits, forget_spec_from_args, make_splits
from .measure import AccuracyCurve, Measure, batch_sizes, default_eval_every, split_accuracies, warm_up_on
from .metrics import accuracy, evaluate_model, predict
from .models import build_model, pretrain_recipe, to_device
from .pruning import TRACE_BATCH_SIZE, import_torch_pruning, model_cost, prune
from .settings import PAPER_RECIPE, PRETRAIN_OPTIONS, preset_recipe
from .tracking import active, add_tracking_arguments, check_tracking, script_run
from .training import deterministic_mode, seed_everything, train, train_from_scratch
from .weights import described_by

_cli_depth = 0


def cli(main, argv=None):
    """Run main(argv): a UserError becomes a one-line message and its exit status; Ctrl-C (130) and SIGTERM (143)
    stop it with one line saying which files, if any, it had written. A nested call (continual.py running a method
    script in-process) lets interruptions through to the outermost one."""
    global _cli_depth
    outermost = _cli_depth == 0
    previous_handler = None
    if outermost:
        written.clear()
        with contextlib.suppress(ValueError):  # only the main thread may install signal handlers
            previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    _cli_depth += 1
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    except KeyboardInterrupt as interruption:
        if not outermost:
            raise
        kept = f"wrote {', '.join(map(str, written))} before stopping" if written else "nothing written"
        print(f"interrupted: {kept}; other existing files unchanged", file=sys.stderr)
        sys.exit(143 if isinstance(interruption, Terminated) else 130)
    finally:
        _cli_depth -= 1
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


@contextlib.contextmanager
def nested_cli():
    """Inside the block cli() runs as a nested call, whatever the caller: a sweep running a script in-process keeps
    Ctrl-C and SIGTERM for itself."""
    global _cli_depth
    _cli_depth += 1
    try:
        yield
    finally:
        _cli_depth -= 1


@dataclass
class Context:
    """Everything a method's unlearn() may need beside the model."""
    args: argparse.Namespace
    data: Data
    splits: Splits
    spec: ForgetSpec
    device: torch.device
    epochs: int
    lr: float
    batch_size: int
    original: nn.Module | None = None
    prune_amount: float | None = None
    prune_mode: str | None = None
    lora: LoraSettings | None = None
    hyperparameters: dict | None = None  # a method's own settings, saved in the checkpoint's meta

    def retain_batches(self):
        return Batches(self.data.train_images, self.data.train_labels, self.splits.retain_idx, self.batch_size,
                       seed=self.args.seed, dataset=self.data.dataset)

    def forget_batches(self, batch_size=None):
        return Batches(self.data.train_images, self.data.train_labels, self.splits.forget_idx,
                       batch_size or self.batch_size, seed=self.args.seed, dataset=self.data.dataset)

    def example_input(self):
        return normalize(self.data.train_images[:2], self.data.dataset)

    def batch_sizes(self):
        """Every batch size the method may train on: the retain and forget sets' batches (full and last, at the
        forget set's own batch size where the method has one)."""
        forget_batch_size = getattr(self.args, "forget_batch_size", None) or self.batch_size
        return (batch_sizes(len(self.splits.retain_idx), self.batch_size)
                | batch_sizes(len(self.splits.forget_idx), forget_batch_size)
                | batch_sizes(len(self.splits.forget_idx), self.batch_size))

    def look_sizes(self):
        """The batch sizes of the forward passes (eval mode, no gradients) that look at the model rather than train
        it: torch-pruning's trace and the adapters' check on example_input."""
        return {TRACE_BATCH_SIZE, len(self.example_input())}

    def warm_up(self, model):
        """An untimed warm-up of model on every batch size and mode the method meets (SCRUB's teacher included);
        inside a compiling() block it also compiles the training step for those batch sizes."""
        warm_up_on(model, self.data, self.splits.retain_idx, self.batch_size, self.batch_sizes(), self.original,
                   self.look_sizes(), freeze_batchnorm=getattr(self.args, "bn", None) == "frozen")

    def import_libraries(self):
        """Import the libraries the method's steps use (peft for LoRA, torch-pruning for physical pruning), so that
        their start-up is paid before the timed block and by every run alike, whatever ran before in the process."""
        if hasattr(self.args, "lora_rank"):
            import_peft()
        if getattr(self.args, "prune_mode", None) == "physical":
            import_torch_pruning()

    def prune(self, model):
        """Prune model by --prune-amount and --prune-mode, recording both in the checkpoint's meta."""
        self.prune_amount = self.args.prune_amount
        self.prune_mode = self.args.prune_mode
        return prune(model, self.prune_amount, self.prune_mode)

    def add_lora(self, model):
        """Attach LoRA adapters configured by the arch's defaults and the --lora-* flags."""
        self.lora = lora_settings(self.args.arch, self.args, model)
        return add_lora(model, self.lora, self.example_input())


def train_on_retain(model, ctx):
    """The paper's training step: cross-entropy on the retain set (BatchNorm in eval mode under --bn frozen)."""
    batchnorm = getattr(ctx.args, "bn", None)  # only the LoRA scripts have --bn
    if batchnorm is not None:
        ctx.hyperparameters = {**(ctx.hyperparameters or {}), "bn": batchnorm}
    return train(model, ctx.retain_batches(), ctx.epochs, ctx.lr, desc=ctx.args.method,
                 freeze_batchnorm=batchnorm == "frozen")


def run_method(method, unlearn, doc, argv=None, add_arguments=None, fit=train_on_retain, prunes=False,
               uses_lora=False):
    """Command-line entry of an unlearning script: load the original, unlearn(model, ctx), fit, save.

    unlearn prepares the model (prune, attach LoRA, ...) and returns it; fit(model, ctx) trains it
    (cross-entropy on the retain set unless the method brings its own). Both are timed as the RTE; an untimed
    warm-up on the prepared model runs between them.
    prunes / uses_lora give the script the --prune-* / --lora-* flags; a script without them rejects them."""
    def main(argv):
        parser = make_parser(doc)
        add_common_arguments(parser)
        add_method_arguments(parser, prune=prunes, lora=uses_lora)
        if add_arguments is not None:
            add_arguments(parser)
        add_tracking_arguments(parser)
        args = parser.parse_args(argv)
        args.method = method
        check_tracking(args)
        recipe = preset_recipe(getattr(args, "recipe", PAPER_RECIPE), args.preset)
        with deterministic_mode(args.deterministic), script_run(args):
            return unlearn_and_save(args, unlearn, fit, name_settings(parser, args, recipe))
    return cli(main, argv)


def unlearn_and_save(args, unlearn, fit=train_on_retain, settings=None):
    """Load the original model and data, unlearn and fit, then save; every input is checked before training.

    The original is any weights load_checkpoint reads (--weights); the script's --arch, --preset and --dataset
    describe a file without this project's meta and must agree with one that has it.

    settings: the non-default model-changing flags (name_settings), named in the default output path."""
    spec = forget_spec_from_args(args) or ForgetSpec()
    out = check_out_path(args, weights_path(args.arch, args.method, args.preset, spec, settings=settings,
                                            dataset=args.dataset))
    source = Path(args.weights) if args.weights else weights_path(args.arch, "original", args.preset,
                                                                  dataset=args.dataset)
    if not source.is_file():
        flags = (" --preset smoke" if args.preset == "smoke" else "") + \
            (f" --dataset {args.dataset}" if args.dataset != DEFAULT_DATASET else "")
        raise UserError(f"no original model at {source}: run `python pretrain.py --arch {args.arch}{flags}` first, "
                        f"or pass --weights PATH")
    device = torch.device(args.device)
    model = load_checkpoint(source, device, **described_by(args))[0]
    data = load_data(args.data, device, args.preset, args.dataset)
    splits = make_splits(data.train_labels, data.test_labels, spec)
    check_splits(splits, spec, args.data)
    recipe = with_overrides(getattr(args, "recipe", PAPER_RECIPE), args)
    ctx = Context(args, data, splits, spec, device, recipe["epochs"], recipe["lr"], recipe["batch_size"])
    if getattr(args, "needs_original", False):
        ctx.original = copy.deepcopy(model)
    seed_everything(args.seed)
    print(f"{args.method}: {len(splits.retain_idx)} retain and {len(splits.forget_idx)} forget images, "
          f"{ctx.epochs} epoch(s) on {device_name(device)}", flush=True)
    # Untimed: the libraries the method uses are imported, and two warm-ups (each leaves the model exactly as it
    # was) run every batch shape and mode of the method: one for the device's start-up, one on the prepared model
    # (LoRA, pruned shapes), so the RTE (unlearn + fit) holds neither.
    ctx.import_libraries()
    ctx.warm_up(model)
    tracker = active().start(out.stem, lambda: tracked_settings(args, spec, recipe, settings))
    measure = Measure(device)
    with measure:
        model = unlearn(model, ctx)
    with compiling(getattr(args, "compile", False), device) as compiled:  # --compile: compiled in the warm-up
        ctx.warm_up(model)
        with measure, tracker.watching(lambda: split_accuracies(model, data, splits, ctx.batch_size)):
            model = fit(model, ctx)
        compile_meta = compiled.meta() if compiled else {}
    measure.seconds -= tracker.eval_seconds  # the tracked accuracy curve is not training time
    model = finalize(model)
    meta = run_meta(args, spec, ctx.epochs, ctx.lr, ctx.batch_size, len(splits.retain_idx), measure)
    meta.update(compile=bool(compiled), **compile_meta)
    meta.update(source_weights=str(source), data_mem_mb=data.resident_mb, prune_amount=ctx.prune_amount,
                prune_mode=ctx.prune_mode if ctx.prune_amount else None,
                lora=asdict(ctx.lora) if ctx.lora else None, settings=settings or {}, **model_cost(model))
    if ctx.hyperparameters:
        meta["hyperparameters"] = ctx.hyperparameters
    save_checkpoint(out, model, meta)
    log_final_metrics(tracker, model, data, splits, args.seed, meta)
    report_saved(out, meta)
    return out


def run_meta(args, spec, epochs, lr, batch_size, train_images, measure):
    """Checkpoint meta shared by every training script."""
    return {"arch": args.arch, "dataset": args.dataset, "preset": args.preset, "method": args.method,
            "forget": spec.to_dict() if spec else None, "seed": args.seed, "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "train_images": train_images, "prune_amount": None, "prune_mode": None,
            "lora": None, "rte_s": measure.seconds, "peak_gpu_mem_mb": measure.peak_gpu_mem_mb,
            "resident_gpu_mem_mb": measure.baseline_gpu_mem_mb,
            "device": device_name(args.device), "deterministic": getattr(args, "deterministic", False),
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def tracked_settings(args, spec, recipe, settings):
    """The hyperparameters a tracked run shows: what it is and how it was trained."""
    return {"arch": args.arch, "method": args.method, "dataset": args.dataset,
            "data_label": data_label(args.data, args.dataset),
            "forget": spec.tag if spec else None, "seed": args.seed, "preset": args.preset, "recipe": recipe,
            "settings": settings or {}}


def log_final_metrics(tracker, model, data, splits, seed, meta):
    """For a run the script opened itself (--track, no sweep around it): UA, RA, TA and MIA-efficacy of the
    trained model, as evaluate.py gives them, with its RTE and peak GPU memory."""
    if tracker.opener == "script" and tracker:
        tracker.log_final({**evaluate_model(model, data, splits, seed), "RTE_s": meta["rte_s"],
                           "peak_gpu_mem_mb": meta["peak_gpu_mem_mb"]})


def report_saved(out, meta):
    memory = f", peak GPU memory {meta['peak_gpu_mem_mb']:.0f} MB" if meta["peak_gpu_mem_mb"] is not None else ""
    print(f"{meta['method']}: {meta['rte_s']:.1f} s on {meta['device']}{memory} -> {out}")


def run_from_scratch(method, doc, argv=None):
    """Command-line entry of pretrain.py (all training images) and retrain.py (the retain set only)."""
    def main(argv):
        parser = make_parser(doc)
        add_common_arguments(parser)
        parser.add_argument("--eval-every", type=nonnegative_int, metavar="N",
                            help="print test accuracy and images/s after every N-th epoch and the last, saved as "
                                 "meta['curve'] (retrain: the test images of the retained classes); 0: never "
                                 "(default: about ten points per run, epochs // 10)")
        add_pretrain_option_arguments(parser)
        add_tracking_arguments(parser)
        args = parser.parse_args(argv)
        args.method = method
        check_tracking(args)
        spec = (forget_spec_from_args(args) or ForgetSpec()) if method == "retrain" else None
        if method != "retrain" and forget_spec_from_args(args) is not None:
            raise UserError("pretrain.py trains on every training image; forget flags belong to retrain.py")
        base_recipe = pretrain_recipe(args.arch, args.dataset)
        settings = name_settings(parser, args, {**PRETRAIN_OPTIONS, **preset_recipe(base_recipe, args.preset,
                                                                                    from_scratch=True)})
        out = check_out_path(args, weights_path(args.arch, method, args.preset, spec, settings=settings,
                                                dataset=args.dataset))
        with deterministic_mode(args.deterministic), script_run(args):
            device = torch.device(args.device)
            data = load_data(args.data, device, args.preset, args.dataset)
            all_test = torch.arange(len(data.test_labels), device=device)
            splits = make_splits(data.train_labels, data.test_labels, spec or ForgetSpec())
            if spec:
                check_splits(splits, spec, args.data)
                idx, test_idx = splits.retain_idx, splits.test_idx
            else:
                idx, test_idx = torch.arange(len(data.train_labels), device=device), all_test
            recipe = {**PRETRAIN_OPTIONS, **with_overrides(base_recipe, args, from_scratch=True)}
            recipe.update({key: getattr(args, key) for key in ("mixup_alpha", "cutmix_alpha", "compile")
                           if getattr(args, key) is not None})
            seed_everything(args.seed)
            info = DATASETS[args.dataset]
            model = to_device(build_model(args.arch, args.preset, info.num_classes, info.image_size), device)
            print(f"{method}: {len(idx)} training images, {recipe['epochs']} epoch(s) on {device_name(device)}",
                  flush=True)
            warm_up_on(model, data, idx, recipe["batch_size"])
            every = default_eval_every(recipe["epochs"]) if args.eval_every is None else args.eval_every
            curve = AccuracyCurve(model, data.test_images, data.test_labels, test_idx, every, recipe["epochs"],
                                  len(idx), desc=method, dataset=data.dataset)
            tracker = active().start(out.stem, lambda: tracked_settings(args, spec, recipe, settings))
            with Measure(device) as measure, tracker.watching(
                    lambda: split_accuracies(model, data, splits, recipe["batch_size"]), every or recipe["epochs"]):
                curve.begin()
                train_from_scratch(model, data, idx, recipe, args.seed, desc=method, curve=curve)
            measure.seconds -= curve.eval_seconds + tracker.eval_seconds  # evaluation is not training time
            meta = run_meta(args, spec, recipe["epochs"], recipe["lr"], recipe["batch_size"], len(idx), measure)
            meta.update(recipe=recipe, settings=settings, eval_every=every, curve=curve.points,
                        data_mem_mb=data.resident_mb)
            save_checkpoint(out, model, meta)
            log_final_metrics(tracker, model, data, splits, args.seed, meta)
            test_accuracy = accuracy(predict(model, data.test_images, all_test, dataset=data.dataset), data.test_labels)
        report_saved(out, meta)
        print(f"test accuracy (all classes): {test_accuracy:.2f} %")
        return out
    return cli(main, argv)
