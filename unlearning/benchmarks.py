"""Published benchmarks the sweep reproduces: their arch, forget setting, from-scratch recipe, each method's script and
recipe, and the file of published values their table is set beside.

    python reproduce.py --benchmark salun --preset smoke   # a CPU check of SalUn's Table 1 setting
    python reproduce.py --benchmark salun --list-units     # its GPU units, in priority order

A benchmark is one entry of BENCHMARKS; its sweep runs as units of the ordinary one (units.py), each run passing the
benchmark's recipe to its script as flags. Every value and its source line is in docs/reproducing.md.
"""
import json
from dataclasses import dataclass, field

from .errors import UserError
from .settings import REPOSITORY, preset_recipe


@dataclass(frozen=True)
class BenchmarkMethod:
    """One row of a benchmark: the script that makes it, its recipe (None: the script's own) and its extra flags."""
    script: str
    recipe: dict | None = None
    flags: dict = field(default_factory=dict)
    published: str | None = None  # its row's name in the published table


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    arch: str
    dataset: str  # a name in datasets.DATASETS
    forget_random: float
    # The original model's and retrain's recipe as the publication's code trains them; the runs train with the arch's
    # own from-scratch recipe, which must equal it (tests check).
    from_scratch: dict
    methods: dict  # {method name in our tables: BenchmarkMethod}, in priority order
    published: str  # the published values, relative to the repository
    retrain_published: str = "Retrain"

    def method(self, name):
        if name not in self.methods:
            raise UserError(f"benchmark {self.name} has no method {name!r}; its methods: {' '.join(self.methods)}")
        return self.methods[name]

    def method_recipe(self, name, preset):
        """The recipe of method name under preset, None when it runs with its script's own."""
        recipe = self.method(name).recipe
        return None if recipe is None else preset_recipe(recipe, preset)


def recipe_flags(recipe):
    """Command-line flags that make a method script train with recipe: --epochs, --lr and --batch-size."""
    return ["--epochs", str(recipe["epochs"]), "--lr", str(recipe["lr"]), "--batch-size", str(recipe["batch_size"])]


def method_flags(method):
    return [text for flag, value in method.flags.items() for text in (f"--{flag}", str(value))]


# SalUn's official code, OPTML-Group/Unlearn-Saliency at commit a6e89fd, Classification/: README.md's commands and
# arg_parser.py's defaults; where its README leaves a value as a placeholder, Unlearn-Sparse's README (the code SalUn
# adapts) gives it. docs/reproducing.md names the line of every value.
SALUN_UNLEARN = {"epochs": 10, "lr": 0.013, "batch_size": 256}
BENCHMARKS = {
    "salun": Benchmark(
        name="salun",
        title="SalUn (Fan et al., ICLR 2024), Table 1: 10 % random data forgetting, CIFAR-10, ResNet-18",
        arch="resnet18",
        dataset="cifar10",
        forget_random=0.1,
        from_scratch={"epochs": 182, "lr": 0.1, "batch_size": 256, "optimizer": "sgd", "momentum": 0.9,
                      "nesterov": False, "weight_decay": 5e-4, "label_smoothing": 0.0, "lr_drop_epochs": [91, 136],
                      "lr_drop": 0.1},
        methods={
            "ft": BenchmarkMethod("l1sparse.py", {"epochs": 10, "lr": 0.01, "batch_size": 256}, {"l1-alpha": 0.0},
                                  "FT"),
            "rl": BenchmarkMethod("rl.py", SALUN_UNLEARN, published="RL"),
            "ga": BenchmarkMethod("ga.py", {"epochs": 5, "lr": 1e-4, "batch_size": 256}, published="GA"),
            "l1sparse": BenchmarkMethod("l1sparse.py", {"epochs": 10, "lr": 0.01, "batch_size": 256},
                                        {"l1-alpha": 1e-4}, "ℓ1-sparse"),
            "salun": BenchmarkMethod("salun.py", SALUN_UNLEARN, {"saliency-share": 0.5, "saliency": "paper"}, "SalUn"),
            "finetune": BenchmarkMethod("finetune.py"),
            "pruneft": BenchmarkMethod("pruneft.py"),
            "lora": BenchmarkMethod("lora.py"),
            "loraprune": BenchmarkMethod("loraprune.py"),
        },
        published="results/published/salun_table1.json",
    ),
}


def get_benchmark(name):
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; known: {' '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_published(benchmark):
    """The benchmark's published values: {"title", "citation", "source", "rows": [{"method", metric: [mean, std]}]}.
    A missing or unreadable file is a one-line error."""
    path = REPOSITORY / benchmark.published
    try:
        published = json.loads(path.read_text())
        rows = published["rows"]
        if not all(isinstance(row, dict) and "method" in row for row in rows):
            raise ValueError("a row without a method")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read the published values of benchmark {benchmark.name} from {path}: "
                        f"{type(error).__name__}: {error}") from None
    return published
