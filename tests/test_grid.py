"""Every (dataset, arch) pair end to end under --preset smoke: pretrain.py, the four paper methods, retrain.py and
evaluate.py, run in this process on tiny synthetic files in each dataset's standard layout. Each pair's original is
trained once per session (conftest's smoke_original) and shared by its methods; each pair's scripts run once (the
module-scoped pair_run) and the tests below check what they wrote."""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import grid_run_in, run_script, smoke_flags

import common

METHODS = ("finetune", "pruneft", "lora", "loraprune")
PAIRS = [(dataset, arch) for dataset in common.DATASET_NAMES for arch in common.ARCHS]
JSON_KEYS = {"path", "arch", "method", "dataset", "forget_names", "UA", "RA", "TA", "MIA_efficacy", "RTE_s",
             "peak_gpu_mem_mb"}
# loraprune prunes physically on the one dataset of another image size, so torch-pruning's traces see 64x64 inputs.
PRUNE_MODE = {"tinyimagenet": "physical"}


@dataclass
class PairRun:
    dataset: str
    arch: str
    root: Path          # the dataset's synthetic files
    folder: Path        # where the scripts ran (model_weights/, eval.json)
    forget_class: int
    prune_mode: str
    made: list          # the checkpoints' file names, in the order evaluate.py was given them
    rows: list          # evaluate.py's JSON rows, one per checkpoint

    def path(self, method):
        spec = None if method == "original" else self.spec
        settings = {"prune-mode": self.prune_mode} if method == "loraprune" and self.prune_mode != "mask" else None
        return self.folder / common.weights_path(self.arch, method, "smoke", spec, settings=settings,
                                                 dataset=self.dataset)

    @property
    def spec(self):
        return common.ForgetSpec((self.forget_class,))

    def load(self, method):
        return common.load_checkpoint(self.path(method), "cpu", dataset=self.dataset)


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{dataset}-{arch}" for dataset, arch in PAIRS])
def pair_run(request, smoke_original, grid_dataset_dir):
    """The four paper methods and retrain.py from the pair's shared original, then evaluate.py on every checkpoint.
    CIFAR-10 forgets its default class (names as they always were); every other dataset its last class."""
    dataset, arch = request.param
    info = common.DATASETS[dataset]
    folder = smoke_original(arch, dataset).parent.parent
    forget_class = common.DEFAULT_FORGET_CLASS if dataset == "cifar10" else info.num_classes - 1
    forget = [] if dataset == "cifar10" else ["--forget-class", forget_class]
    prune_mode = PRUNE_MODE.get(dataset, "mask")
    flags = [*smoke_flags(arch, dataset, grid_dataset_dir(dataset)), *forget]
    with grid_run_in(folder, dataset):
        for method in METHODS:
            extra = ["--prune-mode", prune_mode] if method == "loraprune" and prune_mode != "mask" else []
            assert run_script(f"{method}.py", *flags, *extra) == 0, method
        assert run_script("retrain.py", *flags) == 0
        made = sorted(Path("model_weights").glob("*.pth"))
        assert run_script("evaluate.py", *made, "--data", grid_dataset_dir(dataset), "--device", "cpu", *forget,
                          "--json", "eval.json") == 0
    rows = json.loads((folder / "eval.json").read_text())
    return PairRun(dataset, arch, grid_dataset_dir(dataset), folder, forget_class, prune_mode,
                   [path.name for path in made], rows)


def test_each_script_writes_its_documented_name(pair_run):
    """The dataset is named after the arch for every dataset but CIFAR-10, whose names stay as they were."""
    made = sorted(pair_run.folder.glob("model_weights/*.pth"))
    assert made == sorted(pair_run.path(method) for method in ("original", *METHODS, "retrain"))
    prefix = f"{pair_run.arch}-smoke_" + ("" if pair_run.dataset == "cifar10" else f"{pair_run.dataset}_")
    assert all(path.name.startswith(prefix) for path in made)
    if pair_run.dataset == "cifar10":
        assert [path.name for path in made] == sorted(f"{pair_run.arch}-smoke_{method}.pth"
                                                      for method in ("original", *METHODS, "retrain"))


def test_every_checkpoint_names_its_dataset_arch_and_run(pair_run):
    info = common.DATASETS[pair_run.dataset]
    data = common.load_data(pair_run.root, "cpu", "smoke", pair_run.dataset)
    images = len(data.train_labels) + len(data.test_labels)  # uint8 3xSxS each with an int64 label
    for method in ("original", *METHODS, "retrain"):
        model, meta = pair_run.load(method)
        assert meta["dataset"] == pair_run.dataset and meta["arch"] == pair_run.arch and meta["preset"] == "smoke"
        assert common.input_size(model) == info.image_size
        assert model(torch.zeros(1, 3, info.image_size, info.image_size)).shape == (1, info.num_classes)
        assert meta["rte_s"] > 0 and meta["device"] == "cpu"
        assert meta["peak_gpu_mem_mb"] is None and meta["resident_gpu_mem_mb"] is None
        assert meta["data_mem_mb"] == pytest.approx(images * (3 * info.image_size ** 2 + 8) / 2**20)
        if method != "original":
            assert meta["forget"] == pair_run.spec.to_dict()
    _, meta = pair_run.load("loraprune")
    assert meta["prune_amount"] == 0.5 and meta["prune_mode"] == pair_run.prune_mode
    assert meta["lora"]["rank"] == common.LORA_DEFAULTS[pair_run.arch]["rank"]


def test_evaluate_scores_every_checkpoint_on_the_forgotten_class(pair_run):
    names = common.load_data(pair_run.root, "cpu", "smoke", pair_run.dataset).class_names
    assert [Path(row["path"]).name for row in pair_run.rows] == pair_run.made  # a row per checkpoint, in order
    rows = {row["method"]: row for row in pair_run.rows}
    assert sorted(rows) == sorted(("original", *METHODS, "retrain"))
    for row in pair_run.rows:
        assert JSON_KEYS <= row.keys()
        assert row["dataset"] == pair_run.dataset and row["forget_names"] == [names[pair_run.forget_class]]
        assert all(0 <= row[key] <= 100 for key in common.METRIC_KEYS)
        assert row["peak_gpu_mem_mb"] is None
    assert rows["retrain"]["UA"] == 100  # trained without the class, its logit only ever goes down


def zero_rows(weight):
    return int((weight.flatten(1).abs().sum(1) == 0).sum())


def test_pruned_channels_are_zero_or_gone(pair_run):
    """Mask pruning leaves half of each target's output rows exactly zero; physical pruning halves the targets."""
    original = common.prune_targets(pair_run.load("original")[0])
    for method in ("pruneft", "loraprune"):
        targets = common.prune_targets(pair_run.load(method)[0])
        assert len(targets) == len(original) > 0
        if method == "loraprune" and pair_run.prune_mode == "physical":
            assert [t.weight.shape[0] for t in targets] == [t.weight.shape[0] // 2 for t in original]
        else:
            assert [zero_rows(t.weight) for t in targets] == [round(0.5 * t.weight.shape[0]) for t in original]


def test_lora_changed_only_its_adapters_and_the_layers_it_trains_in_full(pair_run):
    """Every weight outside the LoRA targets and the fully trained modules equals the original's, bit for bit
    (BatchNorm's running statistics aside, which training mode updates); the merged adapters changed their layers."""
    model, meta = pair_run.load("lora")
    original = pair_run.load("original")[0].state_dict()
    targets, full = meta["lora"]["targets"], meta["lora"]["train_full"]
    changed = set()
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if "running_" in key or "num_batches_tracked" in key:
            continue
        if re.fullmatch(targets, module) or any(module == name or module.startswith(f"{name}.") for name in full):
            changed |= {module} if not torch.equal(tensor, original[key]) else set()
        else:
            assert torch.equal(tensor, original[key]), key
    adapted = {module for module, _ in model.named_modules() if re.fullmatch(targets, module)}
    assert adapted and adapted <= changed
