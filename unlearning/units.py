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

from .checkpoints import weights_path
from .errors import UserError
from .models import ARCHS
from .settings import RESULTS_DIR

RUNS_DIR = RESULTS_DIR / "runs"


def forget_flags(spec):
    if spec.random_fraction is not None:
        return ["--forget-random", str(spec.random_fraction), "--forget-seed", str(spec.seed)]
    return ["--forget-class", *map(str, spec.classes), "--forget-seed", str(spec.seed)]


def results_stem(arch, preset, spec):
    """{arch}[-smoke][_{forget tag}], named like the checkpoints; the default forget setting is unmarked."""
    return weights_path(arch, "", preset, spec).stem.removesuffix("_")


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

    @property
    def name(self):
        return unit_name(self.arch, self.seed, self.kind)


def unit_name(arch, seed, kind):
    return f"{arch}-s{seed}-{kind}"


def make_run(arch, method, seed, args, spec):
    """The run of method (original, retrain or an unlearning script) for arch and seed under args."""
    checkpoint = weights_path(arch, method, args.preset, spec, seed)
    plan_flags = ["--arch", arch, "--preset", args.preset, "--seed", str(seed)]
    io_flags = ["--data", str(args.data), "--device", args.device, "--out", str(checkpoint)]
    if method == "original":
        script = "pretrain.py"
    else:
        script = f"{method}.py"
        plan_flags += forget_flags(spec)
        if method != "retrain":
            io_flags += ["--weights", str(weights_path(arch, "original", args.preset, spec, seed))]
    return Run(arch, method, seed, script, checkpoint, RUNS_DIR / f"{checkpoint.stem}.json", plan_flags, io_flags)


def plan_units(args, spec):
    """Every unit in priority order: archs in the arch table's order, seeds in order, a seed's methods unit before
    its retrain."""
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


