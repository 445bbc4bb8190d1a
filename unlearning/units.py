"""The sweep's units: each (arch, seed) half of the comparison as a list of runs, planned in priority order.

    python reproduce.py --list-units                          # every unit of the sweep, in priority order
    python reproduce.py --units resnet50-s0-retrain           # run one unit

A unit is one (arch, seed) half of the comparison that needs nothing from any other unit: "methods"
pretrains that seed's own original model, runs every method from it and evaluates each checkpoint;
"retrain" retrains from scratch on the retain set and evaluates it. Each run leaves a small JSON record in
results/runs/ (records.py).
"""
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import get_benchmark, method_flags, recipe_flags
from .checkpoints import weights_path
from .datasets import DEFAULT_DATASET
from .errors import UserError
from .models import ARCHS
from .settings import RESULTS_DIR

RUNS_DIR = RESULTS_DIR / "runs"


def forget_flags(spec):
    if spec.random_fraction is not None:
        return ["--forget-random", str(spec.random_fraction), "--forget-seed", str(spec.seed)]
    return ["--forget-class", *map(str, spec.classes), "--forget-seed", str(spec.seed)]


def results_stem(arch, preset, spec, dataset=DEFAULT_DATASET, benchmark=None):
    """{arch}[-smoke][_{dataset}][_{forget tag}][_bench={benchmark}], named like the checkpoints; CIFAR-10 and the
    default forget setting are unmarked."""
    stem = weights_path(arch, "", preset, spec, settings=benchmark_setting(benchmark), dataset=dataset).stem
    return stem.replace("__", "_").removesuffix("_")


def benchmark_setting(benchmark):
    """The part of a benchmark run's file names that keeps them apart from the ordinary sweep's."""
    return {"bench": benchmark} if benchmark else None


@dataclass
class Run:
    """One step of a unit: the script that makes a checkpoint, its flags, and the record of its metrics."""
    arch: str
    method: str
    seed: int
    script: str
    checkpoint: Path
    record: Path
    plan_flags: list  # what the run is: part of its fingerprint
    io_flags: list  # where it reads and writes: not part of it
    recipe: dict | None = None  # a benchmark's recipe for the run (before the preset's); None: its script's own
    dataset: str = DEFAULT_DATASET

    def __str__(self):
        return f"{self.arch} {self.method} seed {self.seed}"

    @property
    def from_scratch(self):
        return self.method in ("original", "retrain")


@dataclass
class Unit:
    """kind "methods": the seed's original model, then each method from it; kind "retrain": retrain alone."""
    arch: str
    seed: int
    kind: str
    runs: list = field(default_factory=list)
    benchmark: str | None = None

    @property
    def name(self):
        return unit_name(self.arch, self.seed, self.kind, self.benchmark)


def unit_name(arch, seed, kind, benchmark=None):
    return f"{benchmark + '-' if benchmark else ''}{arch}-s{seed}-{kind}"


def make_run(arch, method, seed, args, spec):
    """The run of method (original, retrain or an unlearning script) for arch and seed under args; under
    args.benchmark, a method of that benchmark, its recipe passed to its script as flags."""
    benchmark = getattr(args, "benchmark", None)
    named = benchmark_setting(benchmark)
    dataset = args.dataset
    checkpoint = weights_path(arch, method, args.preset, spec, seed, settings=named, dataset=dataset)
    plan_flags = ["--arch", arch, "--preset", args.preset, "--seed", str(seed)]
    if dataset != DEFAULT_DATASET:  # CIFAR-10's flags stay as they were, so its records stay current
        plan_flags += ["--dataset", dataset]
    if getattr(args, "compile", False):  # in the fingerprint: a compiled record never counts as an eager one
        plan_flags += ["--compile"]
    io_flags = ["--data", str(args.data), "--device", args.device, "--out", str(checkpoint)]
    script = "pretrain.py" if method == "original" else f"{method}.py"
    recipe = None
    if benchmark:
        table = get_benchmark(benchmark)
        if method not in ("original", "retrain"):  # from scratch: the arch's own recipe, the benchmark's
            entry = table.method(method)
            script, recipe = entry.script, entry.recipe
            if recipe is not None:
                plan_flags += recipe_flags(table.method_recipe(method, args.preset))
            plan_flags += method_flags(entry)
    if method != "original":
        plan_flags += forget_flags(spec)
        if method != "retrain":
            io_flags += ["--weights", str(weights_path(arch, "original", args.preset, spec, seed, settings=named,
                                                       dataset=dataset))]
    return Run(arch, method, seed, script, checkpoint, RUNS_DIR / f"{checkpoint.stem}.json", plan_flags, io_flags,
               recipe, dataset)


def plan_units(args, spec):
    """Every unit in priority order: archs in the arch table's order, seeds in order, a seed's methods unit before
    its retrain. Under args.benchmark, the benchmark's arch and methods (args.arch and args.methods as reproduce.py
    sets them)."""
    benchmark = getattr(args, "benchmark", None)
    if benchmark:
        return [Unit(args.arch[0], seed, kind, [make_run(args.arch[0], method, seed, args, spec) for method in methods],
                     benchmark)
                for seed in sorted(args.seeds)
                for kind, methods in (("methods", ["original", *args.methods]), ("retrain", ["retrain"]))]
    units = []
    for arch in sorted(args.arch, key=ARCHS.index):
        for seed in sorted(args.seeds):
            methods = Unit(arch, seed, "methods", [make_run(arch, m, seed, args, spec)
                                                   for m in ["original", *args.methods]])
            units += [methods, Unit(arch, seed, "retrain", [make_run(arch, "retrain", seed, args, spec)])]
    return units


def select_units(units, names):
    """The units called names (all when names is None), in priority order; an unknown name is an error."""
    if names is None:
        return units
    known = {unit.name for unit in units}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"unknown unit {unknown[0]!r} for these flags; `--list-units` lists them: "
                        f"{' '.join(unit.name for unit in units)}")
    return [unit for unit in units if unit.name in names]


