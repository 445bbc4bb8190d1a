"""Benchmark: the same unlearning run in the original scripts' style and with this project's training loop.

    python bench.py                                   # resnet50 + vit, all four methods, 5 epochs -> bench/
    python bench.py --preset smoke --device cpu       # tiny configuration, under a minute on a CPU
    python bench.py --costs --device cpu              # counted costs of every method -> bench/costs/

Per arch and method the run is done twice in one process, from the same weights, on the same data and
for the same epochs: (a) "reference": a PIL-decoding Dataset with ToTensor + Normalize and
DataLoader(batch_size=128, shuffle=True, num_workers=2), fp32, loss.item() every step, as the original
scripts do; (b) "project": common.train on device-resident uint8 batches (bf16 autocast, fused Adam and
channels-last on GPU). pruneft and loraprune also run with --prune-mode physical (project loop only),
with their parameter and MAC counts. Pretraining throughput and the time evaluate.py takes on one
checkpoint (UA, RA, TA, MIA-efficacy) are measured once per arch. Writes bench/results.json and results.md.

--costs counts instead of timing (unlearning.costs): for every method, the five baselines included, both prune modes
and every arch, the full-size model's steady-state training step (FLOPs, dispatched ops, host syncs, bytes saved
for backward, memory, convolution layouts) and the evaluation of one checkpoint, on tiny batches, in the GPU-shaped
mode (UNLEARN_GPU_SHAPED=1: the code a GPU runs, with bf16 autocast, channels-last, fused or foreach optimizers),
scaled to each method's batch size; the ratios to finetune against their floors; and an estimate of GPU time and
memory from the counts. Writes bench/costs/costs.json and costs.md.
"""
import contextlib
import copy
import dataclasses
import datetime
import functools
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import common
from unlearning import costs, kernels

METHODS = ("finetune", "pruneft", "lora", "loraprune")
PHYSICAL_METHODS = ("pruneft", "loraprune")
# How each method prepares the model before training, as in its script (nothing imports a method script).
PREPARE = {
    "finetune": lambda model, ctx: model,
    "pruneft": lambda model, ctx: ctx.prune(model),
    "lora": lambda model, ctx: ctx.add_lora(model),
    "loraprune": lambda model, ctx: ctx.add_lora(ctx.prune(model)),
}
REFERENCE_LOADER = {"batch_size": 128, "shuffle": True, "num_workers": 2}
PRETRAIN_STEPS = {"full": 50, "smoke": 2}
COLUMNS = {"arch": "arch", "task": "task", "method": "method", "prune_mode": "prune mode", "style": "style",
           "seconds": "seconds", "compile_s": "compile s", "recompiles": "recompiles",
           "late_compiles": "late compiles", "images_per_s": "images/s",
           "peak_gpu_mem_mb": "peak GPU MB", "speedup": "speed-up (b)/(a)", "params": "params", "macs": "MACs"}


class PILImages(Dataset):
    """uint8 [N, 3, S, S] images decoded per item through PIL, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def reference_loader(data_cpu, idx, batch_size, seed):
    info = common.DATASETS[data_cpu.dataset]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    dataset = PILImages(data_cpu.train_images[idx.cpu()], data_cpu.train_labels[idx.cpu()], transform)
    return DataLoader(dataset, **dict(REFERENCE_LOADER, batch_size=batch_size),
                      generator=torch.Generator().manual_seed(seed))


def train_reference(model, loader, epochs, lr, device):
    """The original scripts' loop: fp32, plain Adam, a host sync per step for the running loss."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return model


def method_args(args, arch, prune_mode, extra=()):
    """The namespace a method script would parse, with its defaults (LoRA, prune amount)."""
    parser = common.make_parser(__doc__)
    common.add_common_arguments(parser)
    common.add_method_arguments(parser)
    argv = ["--arch", arch, "--dataset", args.dataset, "--preset", args.preset, "--device", args.device,
            "--prune-mode", prune_mode, *extra]
    return parser.parse_args(argv)


def original_model(args, arch):
    """The original checkpoint if there is one, else a fresh model (timings do not depend on the weights)."""
    path = common.weights_path(arch, "original", args.preset, dataset=args.dataset)
    if path.is_file():
        return common.load_checkpoint(path, "cpu", arch=arch, dataset=args.dataset)[0], str(path)
    common.seed_everything(0)
    return dataset_model(arch, args), "random init"


def dataset_model(arch, args):
    """A fresh model of arch for --dataset's classes and image size."""
    info = common.DATASETS[args.dataset]
    return common.build_model(arch, args.preset, info.num_classes, info.image_size)


def run_unlearning(args, arch, method, style, prune_mode, source, data, data_cpu, splits, batch_size):
    """One unlearning run from a copy of source, timed as the RTE (prepare + train, not compile); a result row."""
    device = torch.device(args.device)
    ctx = common.Context(method_args(args, arch, prune_mode), data, splits, common.ForgetSpec(), device, args.epochs,
                         common.PAPER_RECIPE["lr"], batch_size)
    common.seed_everything(0)
    model = copy.deepcopy(source)
    model = model.to(device) if style == "reference" else common.to_device(model, device)
    with common.Measure(device) as prepare:
        model = PREPARE[method](model, ctx)
    # --compile: the project loop's step compiled as the scripts compile it, in an untimed warm-up over the retain
    # set's batch shapes (a fresh Dynamo per row; the recompile limit an error, never a silent fall-back to eager)
    with common.compiling(style == "project" and args.compile, device) as compiled:
        if compiled:
            common.warm_up_on(model, data, splits.retain_idx, batch_size)
        loader = reference_loader(data_cpu, splits.retain_idx, batch_size, 0) if style == "reference" else None
        with common.Measure(device) as measure:
            if style == "reference":
                train_reference(model, loader, args.epochs, ctx.lr, device)
            else:
                common.train(model, ctx.retain_batches(), args.epochs, ctx.lr, desc=method)
        compiles = compiled.meta() if compiled else {}
    seconds = prepare.seconds + measure.seconds
    images = len(splits.retain_idx) * args.epochs
    return {"arch": arch, "task": "unlearn", "method": method, "prune_mode": ctx.prune_mode, "style": style,
            "seconds": seconds, **compiles, "images_per_s": images / seconds,
            "peak_gpu_mem_mb": measure.peak_gpu_mem_mb, **common.model_cost(common.finalize(model))}


def warm_up(source, data, device):
    """Untimed: the libraries the rows use are imported (peft for LoRA, torch-pruning for physical pruning) and
    common.warm_up runs forward and backward passes as the project's loop does (bf16 autocast on the GPU's path)
    and an optimizer step, so one-time start-up costs (imports, kernel libraries, bf16, allocator) land in no row."""
    common.import_peft()
    with contextlib.suppress(common.UserError):  # without torch-pruning, no physical rows are run
        common.import_torch_pruning()
    model = common.to_device(copy.deepcopy(source), device)
    common.warm_up(model, common.normalize(data.train_images[:8], data.dataset), data.train_labels[:8])


def bench_pretraining(args, arch, data):
    """Images/s of pretrain.py's loop (augmentation, one-cycle schedule) over a few steps, after one warm-up step."""
    recipe = dict(common.pretrain_recipe(arch, args.dataset), epochs=1)
    if args.preset == "smoke":
        recipe["batch_size"] = common.SMOKE["batch_size"]
    device = torch.device(args.device)
    common.seed_everything(0)
    model = common.to_device(dataset_model(arch, args), device)
    warm_up = torch.arange(min(recipe["batch_size"], len(data.train_labels)), device=device)
    common.train_from_scratch(model, data, warm_up, recipe, seed=0)
    idx = torch.arange(min(PRETRAIN_STEPS[args.preset] * recipe["batch_size"], len(data.train_labels)), device=device)
    with common.Measure(device) as measure:
        common.train_from_scratch(model, data, idx, recipe, seed=0)
    return {"arch": arch, "task": "pretrain", "style": "project", "seconds": measure.seconds,
            "images_per_s": len(idx) / measure.seconds, "peak_gpu_mem_mb": measure.peak_gpu_mem_mb}


def bench_evaluation(args, arch, source, data, splits):
    """Seconds of evaluate.py's work on one checkpoint: load it, predict train and test images, UA/RA/TA/MIA."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{arch}.pth"
        common.save_checkpoint(path, source, {"arch": arch, "preset": args.preset, "dataset": args.dataset,
                                              "method": "original"})
        with common.Measure(args.device) as measure:
            common.evaluate_checkpoint(path, args.data, args.device,
                                       data_cache={(args.data, args.preset, args.dataset): data})
    images = len(data.train_labels) + len(splits.test_idx)
    return {"arch": arch, "task": "evaluate", "style": "project", "seconds": measure.seconds,
            "images_per_s": images / measure.seconds, "peak_gpu_mem_mb": measure.peak_gpu_mem_mb}


def physical_ratio(rows, arch):
    """Seconds of physically pruned loraprune over finetune, both with the project's loop."""
    def seconds(method, mode):
        found = [r["seconds"] for r in rows if r["arch"] == arch and r["task"] == "unlearn" and r["method"] == method
                 and r["style"] == "project" and r["prune_mode"] == mode]
        return found[0] if found else None
    physical, finetune = seconds("loraprune", "physical"), seconds("finetune", None)
    return physical / finetune if physical and finetune else None


def add_speedups(rows):
    reference = {(r["arch"], r["method"], r["prune_mode"]): r["seconds"] for r in rows if r["style"] == "reference"}
    for row in rows:
        key = (row["arch"], row.get("method"), row.get("prune_mode"))
        if row["style"] == "project" and key in reference:
            row["speedup"] = reference[key] / row["seconds"]


def has_torch_pruning():
    """Whether physical pruning can run here; without torch-pruning its rows are left out, with a note."""
    try:
        common.import_torch_pruning()
    except common.UserError as error:
        print(f"note: {error}; physical-pruning rows left out, MACs not counted")
        return False
    return True


def print_row(row):
    parts = [f"{row['arch']:<8} {row['task']:<8} {row.get('method') or '-':<9} {row.get('prune_mode') or '-':<8} "
             f"{row['style']:<9} {row['seconds']:8.2f} s {row['images_per_s']:9.1f} img/s"]
    if row.get("compile_s") is not None:
        parts.append(f"compile {row['compile_s']:.1f} s ({row['compiles']} compilations, "
                     f"{row['recompiles']} recompilations, {row['late_compiles']} in the timed run)")
    if row.get("peak_gpu_mem_mb") is not None:
        parts.append(f"peak {row['peak_gpu_mem_mb']:.0f} MB")
    if row.get("speedup") is not None:
        parts.append(f"speed-up {row['speedup']:.2f}x")
    if row.get("params") is not None:
        macs = f"{row['macs'] / 1e6:.1f} M" if row["macs"] is not None else "-"
        parts.append(f"{row['params'] / 1e6:.2f} M params, {macs} MACs")
    print("  ".join(parts), flush=True)


def write_results(out, results):
    limit = f", first {results['limit']} training images" if results["limit"] else ""
    common.write_json(out / "results.json", results)
    ratios = "\n".join(f"- {arch}: loraprune (physical) / finetune time = {common.format_cell(ratio)}"
                       for arch, ratio in results["physical_over_finetune"].items())
    partial = "" if results["complete"] else "\n**Incomplete: the run stopped before every row was measured.**\n"
    text = (f"# Benchmark\n{partial}\n- device: {results['device']}\n- date: {results['date']}\n"
            f"- torch: {results['torch']}\n"
            f"- data: {results['data']} (preset {results['preset']}{limit}), {results['epochs']} epoch(s)\n"
            f"- compile: {results['compile']}\n\n{common.markdown_table(results['rows'], COLUMNS)}\n\n{ratios}\n")
    common.write_text(out / "results.md", text)

COST_METHODS = (*METHODS, "ga", "rl", "l1sparse", "salun", "scrub")
# The baselines' batch size and settings, as their scripts' RECIPE and defaults give them.
BASELINE_BATCH_SIZE = 256
COST_PREPARE = {**PREPARE, **{method: PREPARE["finetune"] for method in COST_METHODS if method not in PREPARE}}
# CIFAR-10 with the default forget class: the image counts the per-image counts are scaled to.
COSTED_DATASET = common.DATASETS["cifar10"]  # --costs counts the paper's setting: CIFAR-10 at full size
FULL_SPLIT = {"train": 50_000, "retain": 45_000, "forget": 5_000, "test": 9_000, "all_test": 10_000}
MB = 1e6
COST_COLUMNS = {"arch": "arch", "method": "method", "prune_mode": "prune mode", "lora_dropout": "LoRA dropout",
                "batch_size": "batch", "gflops_per_image": "GFLOP/image", "ops_per_step": "ops/step",
                "launches_per_step": "launches/step",
                "syncs_per_step": "syncs/step", "saved_mb_per_image": "saved MB/image", "params_mb": "params MB",
                "grads_mb": "grads MB", "optimizer_mb": "optimizer MB", "peak_mb": "est. peak MB",
                "channels_last": "channels-last convs", "gpu_s": "est. GPU s"}
FLOOR_COLUMNS = {"arch": "arch", "method": "method", "prune_mode": "prune mode", "lora_dropout": "LoRA dropout",
                 "flops_ratio": "FLOPs / finetune", "flops_floor": "FLOPs floor", "flops_ok": "FLOPs",
                 "memory_ratio": "memory / finetune", "memory_ok": "memory <= finetune",
                 "syncs_ratio": "syncs / finetune", "syncs_ok": "no syncs", "layout_ok": "all channels-last"}
EVAL_COLUMNS = {"arch": "arch", "model": "model", "gflops_per_image": "GFLOP/image", "ops_per_batch": "ops/batch",
                "launches_per_batch": "launches/batch",
                "syncs_per_batch": "syncs/batch", "peak_mb": "est. peak MB", "gpu_s": "est. GPU s"}
COMPILED_COLUMNS = {"arch": "arch", "method": "method", "prune_mode": "prune mode", "lora_dropout": "LoRA dropout",
                    "launches_per_step": "eager launches/step", "model_launches": "of them the model's",
                    "compiled_graphs": "graphs", "generated_kernels": "generated kernels",
                    "library_calls": "library calls", "compiled_launches_per_step": "compiled launches/step",
                    "compiled_over_eager": "compiled / eager", "compiled_ok": "<= 1/3 eager",
                    "cuda_graph_launches_per_step": "launches/step with CUDA graphs", "gpu_s": "est. GPU s eager",
                    "gpu_s_compiled": "est. GPU s compiled", "gpu_s_cuda_graphs": "est. GPU s CUDA graphs"}
# A compiled graph replayed as a CUDA graph: one graph launch, and one copy of the tensor it is handed (the batch into
# the forward, the logits' gradient into the backward) into the graph's static input buffer.
CUDA_GRAPH_LAUNCHES_PER_GRAPH = 2
FLOPS_TOLERANCE = 1.05  # LoRA's own adapters may add up to 5 % above the frozen-weight floor


def adam_step(model, ctx):
    """train_on_retain: Adam on the trainable parameters, cross-entropy on the retain set."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return costs.TrainingStep(ctx.retain_batches(), common.cross_entropy, common.make_adam(trainable, ctx.lr))


def sgd(model, ctx, **kwargs):
    return common.make_sgd(model.parameters(), ctx.lr, **kwargs)


def random_label_batches(ctx):
    """The forget set relabelled, then the retain set; the forget set as one batch, since the retain steps that
    follow are the ones counted."""
    return common.RandomLabelBatches(whole_forget_set(ctx), ctx.retain_batches(), seed=ctx.args.seed)


def whole_forget_set(ctx):
    return ctx.forget_batches(len(ctx.splits.forget_idx))


def l1sparse_step(model, ctx):
    """l1sparse.py's first epoch: cross-entropy, then the full-weight l1 penalty's gradient added, SGD."""
    params = list(model.parameters())
    return costs.TrainingStep(ctx.retain_batches(), common.cross_entropy, sgd(model, ctx),
                              before_step=functools.partial(common.add_l1_gradient, params, common.L1_ALPHA))


def salun_step(model, ctx):
    """salun.py: the saliency mask (counted with the preparation), then SGD with the gradient masked per step."""
    mask = common.saliency_mask(model, whole_forget_set(ctx), common.SALIENCY_SHARE)
    masked_gradient = common.masked_gradient(dict(model.named_parameters()), mask, common.BASELINE_SGD["weight_decay"])
    return costs.TrainingStep(random_label_batches(ctx), common.cross_entropy, sgd(model, ctx, weight_decay=0.0),
                              before_step=masked_gradient)


def scrub_step(model, ctx):
    """scrub.py's min-step on the retain set; its max-step does the same work (student and teacher forward,
    student backward) on forget batches."""
    teacher = ctx.original.eval().requires_grad_(False)
    kd = common.SCRUB_DISTILLATION
    close_to_teacher = common.close_to_teacher(teacher, kd["kd_temperature"], kd["kd_gamma"], kd["kd_alpha"])
    return costs.TrainingStep(ctx.retain_batches(), close_to_teacher, sgd(model, ctx), resident=[teacher])


# One training step of each method, as its script trains (RL and SalUn: the retain steps of their pass).
COST_STEPS = {
    "finetune": adam_step, "pruneft": adam_step, "lora": adam_step, "loraprune": adam_step,
    "ga": lambda model, ctx: costs.TrainingStep(ctx.forget_batches(), common.negated_cross_entropy,
                                                   sgd(model, ctx)),
    "rl": lambda model, ctx: costs.TrainingStep(random_label_batches(ctx), common.cross_entropy, sgd(model, ctx)),
    "l1sparse": l1sparse_step, "salun": salun_step, "scrub": scrub_step,
}


def cost_runs(arch, methods, physical):
    """(method, prune mode, LoRA dropout) of every counted run: both prune modes, the LoRA methods with the
    paper's dropout and with none."""
    for method in methods:
        modes = (["mask", "physical"] if physical else ["mask"]) if method in PHYSICAL_METHODS else [None]
        dropouts = [common.LORA_DEFAULTS[arch]["dropout"], 0.0] if "lora" in method else [None]
        yield from ((method, mode, dropout) for mode in modes for dropout in dropouts)


def cost_data(batch, device):
    """Random CIFAR-shaped images: retain and forget sets of 2.5 batches each (e.g. 2, 2 and 1 images), so a
    counted epoch has a first step, a steady one and a smaller last one."""
    n = 2 * batch + batch // 2
    generator = torch.Generator().manual_seed(0)
    size, classes = COSTED_DATASET.image_size, COSTED_DATASET.num_classes
    images = torch.randint(0, 256, (2 * n, 3, size, size), dtype=torch.uint8, generator=generator)
    others = torch.tensor([c for c in range(classes) if c != common.DEFAULT_FORGET_CLASS])
    labels = torch.cat([torch.full((n,), common.DEFAULT_FORGET_CLASS), others.repeat(n // len(others) + 1)[:n]])
    data = common.Data(images.to(device), labels.to(device), images[:n].to(device), labels[:n].to(device),
                       COSTED_DATASET.name)
    return data, common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec())


def count_method(args, arch, method, mode, dropout, data, splits):
    """(prepared model, counts of preparing it, counts of its training step), counted in the GPU-shaped mode
    (common.gpu_shaped_mode): the project's own GPU code paths (channels-last, bf16 autocast, fused or foreach
    optimizers) on any device."""
    device = torch.device(args.device)
    extra = [] if dropout is None else ["--lora-dropout", str(dropout)]
    ctx = common.Context(method_args(args, arch, mode or "mask", extra), data, splits, common.ForgetSpec(), device,
                         1, common.PAPER_RECIPE["lr"], args.cost_batch)
    with common.gpu_shaped_mode():
        common.normalize(data.train_images[:1])  # its constants are made once per process: in no method's count
        if "lora" in method:
            import peft  # noqa: F401  (peft builds tensors as it is imported: they belong to no method's count)
        common.seed_everything(0)
        model = common.to_device(common.build_model(arch, args.preset), device)
        if method == "scrub":
            ctx.original = copy.deepcopy(model)

        def prepare():
            prepared = COST_PREPARE[method](model, ctx)
            return prepared, COST_STEPS[method](prepared, ctx)
        (prepared, step), prepare_counts = costs.count_ops(prepare)
        counts = costs.count_training(prepared, step, method_batch_size(method))
        if args.compile:  # the same step compiled as --compile compiles it: its graphs' kernels
            inputs, labels = next(iter(step.batches))
            counts["compiled"] = kernels.count_compiled_step(prepared, step.loss_fn, inputs, labels,
                                                             step.freeze_batchnorm)
        return prepared, prepare_counts, counts


def method_batch_size(method):
    return common.PAPER_RECIPE["batch_size"] if method in METHODS else BASELINE_BATCH_SIZE


def cost_row(arch, method, mode, dropout, counts, prepare_counts, assumptions):
    """A table row: the counts scaled to the method's batch size, the estimated peak memory, and the estimated GPU
    time of the paper's workload (5 epochs over the retain set) at that batch size."""
    batch = method_batch_size(method)
    flops = counts["flops_per_image"] * batch + counts["flops_fixed"]
    steps = common.PAPER_RECIPE["epochs"] * math.ceil(FULL_SPLIT["retain"] / batch)
    launches = counts["ops_per_step"] - counts["view_ops_per_step"]  # a view op launches no kernel
    return {"arch": arch, "method": method, "prune_mode": mode, "lora_dropout": dropout, "batch_size": batch,
            "gflops_per_image": counts["flops_per_image"] / 1e9, "gflops_per_step": flops / 1e9,
            "ops_per_step": counts["ops_per_step"], "launches_per_step": launches,
            "syncs_per_step": counts["syncs_per_step"],
            "saved_mb_per_image": counts["saved_bytes_per_image"] / MB,
            "saved_mb_per_step": (counts["saved_bytes_per_image"] * batch + counts["saved_bytes_fixed"]) / MB,
            "params_mb": counts["param_bytes"] / MB, "grads_mb": counts["grad_bytes"] / MB,
            "optimizer_mb": counts["optimizer_state_bytes"] / MB,
            "peak_mb": costs.peak_bytes(counts) / MB,
            "channels_last": f"{counts['channels_last_convolutions']}/{counts['convolutions']}",
            "gpu_steps": steps, "gpu_s": steps * costs.gpu_seconds(launches, assumptions, bf16=flops),
            **compiled_columns(counts, launches, steps, flops, assumptions), "counts": counts,
            "prepare": prepare_counts}


def compiled_columns(counts, launches, steps, flops, assumptions):
    """Under --compile: the step's launches with the model's forward and backward compiled (eager's launches, less
    the model's own, plus the compiled graphs' generated kernels and library calls), and with each compiled graph
    replayed as a CUDA graph (one launch, plus one copy into its static input buffer), with their GPU estimates."""
    if "compiled" not in counts:
        return {}
    compiled = counts["compiled"]
    outside = launches - (counts["model_ops_per_step"] - counts["model_view_ops_per_step"])
    kernel_launches = outside + compiled["generated"] + compiled["library"]
    graph_launches = outside + CUDA_GRAPH_LAUNCHES_PER_GRAPH * compiled["graphs"]
    return {"model_launches": launches - outside, "compiled_graphs": compiled["graphs"],
            "generated_kernels": compiled["generated"], "library_calls": compiled["library"],
            "compiled_launches_per_step": kernel_launches, "compiled_over_eager": kernel_launches / launches,
            "compiled_ok": verdict(kernel_launches <= launches / 3),
            "cuda_graph_launches_per_step": graph_launches,
            "gpu_s_compiled": steps * costs.gpu_seconds(kernel_launches, assumptions, bf16=flops),
            "gpu_s_cuda_graphs": steps * costs.gpu_seconds(graph_launches, assumptions, bf16=flops)}


def eval_row(arch, label, counts, assumptions):
    """evaluate.py's predictions on one checkpoint (every training image, the test images of the kept classes)."""
    images = FULL_SPLIT["train"] + FULL_SPLIT["test"]
    batches = math.ceil(FULL_SPLIT["train"] / common.EVAL_BATCH_SIZE) + math.ceil(FULL_SPLIT["test"] /
                                                                                  common.EVAL_BATCH_SIZE)
    convolution = counts["convolution_flops_per_image"] * images
    other = counts["flops_per_image"] * images - convolution
    launches = counts["ops_per_batch"] - counts["view_ops_per_batch"]
    return {"arch": arch, "model": label, "gflops_per_image": counts["flops_per_image"] / 1e9,
            "ops_per_batch": counts["ops_per_batch"], "launches_per_batch": launches,
            "syncs_per_batch": counts["syncs_per_batch"], "peak_mb": costs.peak_bytes(counts) / MB, "batches": batches,
            "gpu_s": costs.gpu_seconds(launches * batches, assumptions, tf32=convolution, fp32=other),
            "counts": counts}


def verdict(ok):
    return None if ok is None else ("pass" if ok else "FAIL")


def floor_rows(rows):
    """Each row's ratios to finetune (same arch) and whether it meets its floors: a LoRA variant's FLOPs at most
    its own model's forward plus input-gradient work (2x its forward: the frozen weights need no gradient) and its
    memory at most finetune's; no host sync in any step; every convolution channels-last."""
    finetune = {row["arch"]: row for row in rows if row["method"] == "finetune"}
    out = []
    for row in rows:
        base = finetune[row["arch"]]
        lora = row["lora_dropout"] is not None
        flops_floor = 2 * row["counts"]["forward_flops_per_image"] / base["counts"]["flops_per_image"] if lora else None
        flops_ratio = row["gflops_per_image"] / base["gflops_per_image"]
        memory_ratio = row["peak_mb"] / base["peak_mb"]
        convolutions = row["counts"]["convolutions"]
        out.append({key: row[key] for key in ("arch", "method", "prune_mode", "lora_dropout")} | {
            "flops_ratio": flops_ratio, "flops_floor": flops_floor,
            "flops_ok": verdict(flops_ratio <= flops_floor * FLOPS_TOLERANCE if lora else None),
            "memory_ratio": memory_ratio, "memory_ok": verdict(memory_ratio <= 1 if lora else None),
            "syncs_ratio": row["syncs_per_step"] / base["syncs_per_step"] if base["syncs_per_step"] else None,
            "syncs_ok": verdict(row["syncs_per_step"] == 0),
            "layout_ok": verdict(row["counts"]["channels_last_convolutions"] == convolutions)})
    return out


def write_costs(out, results):
    common.write_json(out / "costs.json", results)
    gpu = results["gpu_assumptions"]
    text = (f"# Cost model\n\n- counted on: {results['device']}, torch {results['torch']}, {results['date']}, "
            f"preset {results['preset']}\n"
            f"- counted steps: batches of {results['count_batch']} images in the GPU-shaped mode "
            f"({common.GPU_SHAPED_ENV}=1: the project's own GPU code paths, bf16 autocast, channels-last, fused or "
            f"foreach optimizers), scaled to each method's batch size\n"
            f"- dataset resident on the device (uint8, both splits): {results['dataset_mb']:.0f} MB, not in the "
            f"peaks\n\n## Training step\n\n{common.markdown_table(results['rows'], COST_COLUMNS)}\n\n"
            f"**est. GPU s and est. peak MB are estimates, not measurements**: {results['estimate']}\n\n"
            f"{compiled_section(results)}"
            f"## Floors (ratios to finetune)\n\n{common.markdown_table(results['floors'], FLOOR_COLUMNS)}\n\n"
            f"## Evaluation of one checkpoint\n\n{common.markdown_table(results['evaluation'], EVAL_COLUMNS)}\n\n"
            f"Evaluation runs in fp32: convolutions at {gpu['tf32_tflops']} TFLOP/s (TF32), the rest at "
            f"{gpu['fp32_tflops']} TFLOP/s, both at the same utilisation; the SVC of the MIA runs on the host and "
            f"is not counted.\n")
    (out / "costs.md").write_text(text)
    return text


def compiled_section(results):
    """costs.md's table of the compiled step (bench.py --costs --compile); empty without --compile."""
    rows = [row for row in results["rows"] if "compiled_launches_per_step" in row]
    if not rows:
        return ""
    return (f"## Compiled step (--compile)\n\n{common.markdown_table(rows, COMPILED_COLUMNS)}\n\n"
            f"{COMPILED_NOTE}\n\n")


COMPILED_NOTE = (
    "Counted, not measured on a GPU: the model's forward and backward compiled by inductor on this machine's device, "
    "the step's other launches (data, loss, finite-loss check, optimizer) as eager counts them. Generated kernels "
    "are inductor's code for the counting device (on a CPU: C++ kernels; a CPU also fuses independent loops into "
    "one kernel, which Triton on a GPU does not by default, so a GPU's count may be higher); library calls are the "
    "convolutions, matmuls and fallbacks the compiled graphs leave to libraries, one launch each. With CUDA graphs "
    f"each compiled graph costs {CUDA_GRAPH_LAUNCHES_PER_GRAPH} launches per step (its replay, and the copy of its "
    "input into the graph's static buffer); the kernels inside a replayed graph are not launched from the host. "
    "The GPU estimates charge every launch the same assumed cost, a graph's replay included.")


def estimate_text(assumptions):
    return (f"{assumptions['gpu']}, training FLOPs at {assumptions['utilisation']:.0%} of {assumptions['bf16_tflops']} "
            f"TFLOP/s (bf16 dense) plus {assumptions['launch_us']} us per launch (a dispatched op other than a view), "
            f"without overlap, for the paper's workload: {common.PAPER_RECIPE['epochs']} epochs over "
            f"{FULL_SPLIT['retain']:,} retain images at the method's batch size; peak memory = resident tensors + the "
            f"counted step's peak above them (gradients, optimizer state, activations, temporaries), without "
            f"allocator slack or cuDNN/cuBLAS workspaces")


def run_costs(args):
    """--costs: count every method's training step and evaluation (unlearning.costs); write costs.json and costs.md."""
    out = Path(args.out) / "costs"
    common.check_writable(out / "costs.json", "--out")
    assumptions = dict(costs.GPU_ASSUMPTIONS, utilisation=args.utilisation, launch_us=args.launch_us)
    device = torch.device(args.device)
    data, splits = cost_data(args.cost_batch, device)
    physical = has_torch_pruning()
    rows, evaluation = [], []
    for arch in args.arch:
        for method, mode, dropout in cost_runs(arch, args.methods, physical):
            model, prepare_counts, counts = count_method(args, arch, method, mode, dropout, data, splits)
            rows.append(cost_row(arch, method, mode, dropout, counts, prepare_counts, assumptions))
            print(" ".join(f"{key}={common.format_cell(rows[-1][key])}" for key in COST_COLUMNS), flush=True)
            if (method, mode) in (("finetune", None), ("pruneft", "physical")):
                with common.gpu_shaped_mode():
                    counts = costs.count_evaluation(common.finalize(model), data.train_images, splits.retain_idx,
                                                    args.cost_batch, common.EVAL_BATCH_SIZE)
                evaluation.append(eval_row(arch, "pruned (physical)" if mode else "full", counts, assumptions))
    results = {"device": common.device_name(args.device), "torch": str(torch.__version__),
               "date": datetime.date.today().isoformat(), "preset": args.preset, "count_batch": args.cost_batch,
               "dataset_mb": (FULL_SPLIT["train"] + FULL_SPLIT["all_test"]) * COSTED_DATASET.pixels / MB,
               "gpu_assumptions": assumptions, "estimate": estimate_text(assumptions), "rows": rows,
               "floors": floor_rows(rows) if "finetune" in args.methods else [], "evaluation": evaluation}
    print(write_costs(out, results))
    print(f"-> {out / 'costs.json'}, {out / 'costs.md'}")
    return results


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", nargs="+", choices=common.ARCHS,
                        help=f"archs to time (default: the paper's, {' '.join(common.PAPER_ARCHS)}) or, with --costs, "
                             f"to count (default: all {len(common.ARCHS)})")
    parser.add_argument("--methods", nargs="+", choices=COST_METHODS,
                        help="methods to time (default: the four paper methods) or, with --costs, to count (default: "
                             "all nine)")
    parser.add_argument("--epochs", type=common.positive_int,
                        help="unlearning epochs (default: 5, under --preset smoke 1)")
    parser.add_argument("--preset", default="full", choices=common.PRESETS, help="full or smoke (default: full)")
    common.add_dataset_arguments(parser)
    parser.add_argument("--data-label", help="what the data is, for the table (default: named by the data itself, "
                                             "see docs/data.md)")
    common.add_device_argument(parser)
    parser.add_argument("--compile", action="store_true",
                        help="time the project loop's runs with their training step compiled, as the scripts' "
                             "--compile does (compile time reported separately); with --costs, also count the "
                             "compiled step's kernels")
    parser.add_argument("--limit", type=common.number(int, 5),
                        help="use only the first LIMIT training and LIMIT/5 test images (full-size models on a CPU)")
    parser.add_argument("--out", default="bench", help="folder for results.json and results.md, and for costs/ "
                                                       "(default: bench)")
    parser.add_argument("--costs", action="store_true", help="count FLOPs, ops, syncs and memory per step of every "
                                                             "method instead of timing (see unlearning.costs)")
    parser.add_argument("--cost-batch", type=common.number(int, 2), default=2,
                        help="images per counted step under --costs (default: 2; counts are scaled to each "
                             "method's batch size)")
    parser.add_argument("--utilisation", type=common.open_unit_interval, default=costs.GPU_ASSUMPTIONS["utilisation"],
                        help="share of the GPU's peak FLOP rate assumed by the --costs time estimate (default: 0.4)")
    parser.add_argument("--launch-us", type=common.positive_float, default=costs.GPU_ASSUMPTIONS["launch_us"],
                        help="microseconds per kernel launch (a dispatched op other than a view) assumed by the "
                             "--costs time estimate (default: 5)")
    args = parser.parse_args(argv)
    if args.arch is None:
        args.arch = list(common.ARCHS if args.costs else common.PAPER_ARCHS)
    if args.costs and args.dataset != COSTED_DATASET.name:
        parser.error(f"--costs counts the paper's setting, {COSTED_DATASET.name} at full size; --dataset applies to "
                     f"the timings")
    if args.methods is None:
        args.methods = list(COST_METHODS if args.costs else METHODS)
    elif not args.costs and set(args.methods) - set(METHODS):
        parser.error(f"timing covers {', '.join(METHODS)}; the baselines are counted with --costs")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.costs:
        return run_costs(args)
    if args.epochs is None:
        args.epochs = common.SMOKE["epochs"] if args.preset == "smoke" else common.PAPER_RECIPE["epochs"]
    out = Path(args.out)
    common.check_writable(out / "results.json", "--out")
    data_cpu = common.load_data(args.data, "cpu", args.preset, args.dataset)
    args.data_label = args.data_label or common.data_label(args.data, args.dataset)
    if args.limit:
        data_cpu = dataclasses.replace(data_cpu, train_images=data_cpu.train_images[:args.limit],
                                       train_labels=data_cpu.train_labels[:args.limit],
                                       test_images=data_cpu.test_images[:args.limit // 5],
                                       test_labels=data_cpu.test_labels[:args.limit // 5])
    data = dataclasses.replace(data_cpu, **{name: getattr(data_cpu, name).to(args.device) for name in
                                            ("train_images", "train_labels", "test_images", "test_labels")})
    splits = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec())
    batch_size = common.SMOKE["batch_size"] if args.preset == "smoke" else common.PAPER_RECIPE["batch_size"]
    rows, sources = [], {}
    physical = has_torch_pruning()

    def record(complete):
        """Write what has been measured so far, so a bench stopped early still leaves its finished rows."""
        results = {"device": common.device_name(args.device), "date": datetime.date.today().isoformat(),
                   "torch": str(torch.__version__), "data": args.data_label, "preset": args.preset,
                   "limit": args.limit, "epochs": args.epochs, "compile": args.compile, "weights": sources,
                   "batch_size": batch_size, "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
                   "physical_over_finetune": {arch: physical_ratio(rows, arch) for arch in args.arch},
                   "complete": complete, "rows": rows}
        write_results(out, results)
        return results

    def add(row):
        rows.append(row)
        add_speedups(rows)
        print_row(row)
        record(complete=False)

    for arch in args.arch:
        source, sources[arch] = original_model(args, arch)
        warm_up(source, data, args.device)
        runs = [(method, style, "mask") for method in args.methods for style in ("reference", "project")]
        if physical:
            runs += [(method, "project", "physical") for method in args.methods if method in PHYSICAL_METHODS]
        for method, style, mode in runs:
            add(run_unlearning(args, arch, method, style, mode, source, data, data_cpu, splits, batch_size))
        add(bench_pretraining(args, arch, data))
        add(bench_evaluation(args, arch, source, data, splits))
    results = record(complete=True)
    print(f"-> {out / 'results.json'}, {out / 'results.md'}")
    return results


if __name__ == "__main__":
    common.cli(main)
