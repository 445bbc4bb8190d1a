"""Benchmark: the same unlearning run in the original scripts' style and with this project's training loop.

    python bench.py                                   # resnet50 + vit, all four methods, 5 epochs -> bench/
    python bench.py --preset smoke --device cpu       # tiny configuration, under a minute on a CPU

Per arch and method the run is done twice in one process, from the same weights, on the same data and
for the same epochs: (a) "reference": a PIL-decoding Dataset with ToTensor + Normalize and
DataLoader(batch_size=128, shuffle=True, num_workers=2), fp32, loss.item() every step, as the original
scripts do; (b) "project": common.train on device-resident uint8 batches (bf16 autocast, fused Adam and
channels-last on GPU). pruneft and loraprune also run with --prune-mode physical (project loop only),
with their parameter and MAC counts. Pretraining throughput and the time evaluate.py takes on one
checkpoint (UA, RA, TA, MIA-efficacy) are measured once per arch. Writes bench/results.json and results.md.
"""
import contextlib
import copy
import datetime
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import common

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
           "seconds": "seconds", "compile_s": "compile s", "recompiles": "recompiles", "images_per_s": "images/s",
           "peak_gpu_mem_mb": "peak GPU MB", "speedup": "speed-up (b)/(a)", "params": "params", "macs": "MACs"}


class PILCIFAR10(Dataset):
    """uint8 [N, 3, 32, 32] images decoded per item through PIL, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def reference_loader(data_cpu, idx, batch_size, seed):
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(common.CIFAR_MEAN, common.CIFAR_STD)])
    dataset = PILCIFAR10(data_cpu.train_images[idx.cpu()], data_cpu.train_labels[idx.cpu()], transform)
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


def warm_up_compiled(model, batches):
    """Compile forward and backward for the full and the last, smaller batch, in training mode, then restore
    weights and buffers; returns the seconds taken."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, labels = next(iter(batches))
    sizes = {len(inputs), len(batches.idx) % batches.batch_size} - {0}
    model.train()
    with common.Measure(inputs.device) as measure:
        for size in sizes:
            with common.autocast(inputs.device):
                loss = common.cross_entropy(model, inputs[:size], labels[:size])
            loss.backward()
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return measure.seconds


def method_args(args, arch, prune_mode):
    """The namespace a method script would parse, with its defaults (LoRA, prune amount)."""
    parser = common.make_parser(__doc__)
    common.add_common_arguments(parser)
    common.add_method_arguments(parser)
    argv = ["--arch", arch, "--preset", args.preset, "--device", args.device, "--prune-mode", prune_mode]
    return parser.parse_args(argv)


def original_model(args, arch):
    """The original checkpoint if there is one, else a fresh model (timings do not depend on the weights)."""
    path = common.weights_path(arch, "original", args.preset)
    if path.is_file():
        return common.load_checkpoint(path, "cpu", arch=arch)[0], str(path)
    common.seed_everything(0)
    return common.build_model(arch, args.preset), "random init"


def run_unlearning(args, arch, method, style, prune_mode, source, data, data_cpu, splits, batch_size):
    """One unlearning run from a copy of source, timed as the RTE (prepare + train, not compile); a result row."""
    device = torch.device(args.device)
    ctx = common.Context(method_args(args, arch, prune_mode), data, splits, common.ForgetSpec(), device, args.epochs,
                         common.PAPER_RECIPE["lr"], batch_size)
    common.seed_everything(0)
    compile_s = None
    model = copy.deepcopy(source)
    model = model.to(device) if style == "reference" else common.to_device(model, device)
    with common.Measure(device) as prepare:
        model = PREPARE[method](model, ctx)
    trained, compiles = model, {}
    compiling = style == "project" and args.compile
    with counting_compiles(compiles) if compiling else contextlib.nullcontext():
        if compiling:
            trained = torch.compile(model, backend=common.COMPILE_BACKEND)
            compile_s = warm_up_compiled(trained, ctx.retain_batches())
        loader = reference_loader(data_cpu, splits.retain_idx, batch_size, 0) if style == "reference" else None
        with common.Measure(device) as measure:
            if style == "reference":
                train_reference(trained, loader, args.epochs, ctx.lr, device)
            else:
                common.train(trained, ctx.retain_batches(), args.epochs, ctx.lr, desc=method)
    seconds = prepare.seconds + measure.seconds
    images = len(splits.retain_idx) * args.epochs
    return {"arch": arch, "task": "unlearn", "method": method, "prune_mode": ctx.prune_mode, "style": style,
            "seconds": seconds, "compile_s": compile_s, **compiles, "images_per_s": images / seconds,
            "peak_gpu_mem_mb": measure.peak_gpu_mem_mb, **common.model_cost(common.finalize(model))}


@contextlib.contextmanager
def counting_compiles(row):
    """One bench row's compilation, from a fresh Dynamo (no caches or recompile counts left by earlier rows), with
    the recompile limit an error instead of a silent fall-back to eager; puts the row's graph compilations and
    recompilations (compilations of an already compiled frame) into row."""
    torch._dynamo.reset()
    compiled_per_frame = torch._dynamo.convert_frame.FRAME_COMPILE_COUNTER
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        raise common.UserError(f"--compile: a row recompiled past torch._dynamo.config.recompile_limit "
                               f"({torch._dynamo.config.recompile_limit}) and would have run eager") from None
    row.update(compiles=sum(compiled_per_frame.values()),
               recompiles=sum(count - 1 for count in compiled_per_frame.values()))


def warm_up(source, data, device):
    """One untimed forward and backward, so one-time start-up costs (kernel libraries, allocator) land in no row."""
    model = common.to_device(copy.deepcopy(source), device)
    common.cross_entropy(model, common.normalize(data.train_images[:8]), data.train_labels[:8]).backward()


def bench_pretraining(args, arch, data):
    """Images/s of pretrain.py's loop (augmentation, one-cycle schedule) over a few steps, after one warm-up step."""
    recipe = dict(common.PRETRAIN_RECIPES[arch], epochs=1)
    if args.preset == "smoke":
        recipe["batch_size"] = common.SMOKE["batch_size"]
    device = torch.device(args.device)
    common.seed_everything(0)
    model = common.to_device(common.build_model(arch, args.preset), device)
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
        common.save_checkpoint(path, source, {"arch": arch, "preset": args.preset, "method": "original"})
        with common.Measure(args.device) as measure:
            common.evaluate_checkpoint(path, args.data, args.device, data_cache={(args.data, args.preset): data})
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
                     f"{row['recompiles']} recompilations)")
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


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", nargs="+", default=list(common.ARCHS), choices=common.ARCHS, help="archs to time")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to time")
    parser.add_argument("--epochs", type=common.positive_int,
                        help="unlearning epochs (default: 5, under --preset smoke 1)")
    parser.add_argument("--preset", default="full", choices=common.PRESETS, help="full or smoke (default: full)")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--data-label", help="what the data is, for the table (default: named by the data itself, "
                                             "see docs/data.md)")
    common.add_device_argument(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the project-loop runs (compile time "
                                                                 "reported separately)")
    parser.add_argument("--limit", type=common.number(int, 5),
                        help="use only the first LIMIT training and LIMIT/5 test images (full-size models on a CPU)")
    parser.add_argument("--out", default="bench", help="folder for results.json and results.md (default: bench)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.epochs is None:
        args.epochs = common.SMOKE["epochs"] if args.preset == "smoke" else common.PAPER_RECIPE["epochs"]
    out = Path(args.out)
    common.check_writable(out / "results.json", "--out")
    data_cpu = common.load_cifar10(args.data, "cpu", args.preset)
    args.data_label = args.data_label or common.data_label(args.data)
    if args.limit:
        data_cpu = common.CIFAR10(data_cpu.train_images[:args.limit], data_cpu.train_labels[:args.limit],
                                  data_cpu.test_images[:args.limit // 5], data_cpu.test_labels[:args.limit // 5])
    data = common.CIFAR10(*(getattr(data_cpu, f).to(args.device) for f in common.CIFAR10.__dataclass_fields__))
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
