"""Weights from anywhere: one of our checkpoints saved as a plain state dict, in each wrapper, with DataParallel and
torch.compile prefixes and as .safetensors loads to the same weights and scores the same metrics; unlearning starts
from a plain state dict; the export carries the meta; the described fields' rules."""
import json

import pytest
import safetensors.torch
import torch
from conftest import run_script

import common

SMOKE_RESNET = ["--arch", "resnet50", "--preset", "smoke"]


def weights_from_elsewhere(checkpoint, folder):
    """{name: path} of checkpoint's weights saved as other code saves them (nothing of this project's meta)."""
    state = torch.load(checkpoint, weights_only=True)["model"]
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
             "net": {"net": state, "acc": 80.0}, "module": {f"module.{k}": v for k, v in state.items()},
             "ddp_of_compiled": {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}}
    paths = {}
    for name, content in saved.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(content, paths[name])
    paths["bare_safetensors"] = folder / "bare.safetensors"
    safetensors.torch.save_file(state, paths["bare_safetensors"])
    return paths


def test_weights_from_elsewhere_load_to_the_same_model_and_score_the_same(original_weights, cifar_dir, workdir):
    original = original_weights("resnet50")
    paths = weights_from_elsewhere(original, workdir)
    assert run_script("export.py", original, "--out", workdir / "export.safetensors") == 0
    paths["export"] = workdir / "export.safetensors"
    reference = common.load_checkpoint(original)[0].state_dict()
    for name, path in paths.items():
        state = common.load_checkpoint(path, arch="resnet50", preset="smoke")[0].state_dict()
        assert all(torch.equal(state[key], value) for key, value in reference.items()), name

    out = workdir / "eval.json"
    assert run_script("evaluate.py", original, *paths.values(), *SMOKE_RESNET, "--data", cifar_dir, "--device", "cpu",
                      "--seed", "0", "--json", out) == 0
    rows = json.loads(out.read_text())
    assert [row["path"] for row in rows] == [str(original), *map(str, paths.values())]
    metrics = ("UA", "RA", "TA", "MIA_efficacy")
    for row in rows[1:]:
        assert {key: row[key] for key in metrics} == {key: rows[0][key] for key in metrics}, row["path"]
    assert rows[0]["RA"] > 10  # a trained model: equal metrics are not those of ten coin flips
    assert rows[-1]["method"] == "original" and rows[1]["method"] is None  # the export keeps the meta


def test_export_carries_the_meta_in_the_safetensors_metadata(original_weights, workdir):
    original = original_weights("vit")
    assert run_script("export.py", original, "--out", "vit.safetensors") == 0
    meta = torch.load(original, weights_only=True)["meta"]
    with safetensors.safe_open("vit.safetensors", framework="pt") as file:
        assert json.loads(file.metadata()["meta"]) == json.loads(json.dumps(meta))
    state, read_meta = common.read_weights("vit.safetensors")
    assert read_meta["arch"] == "vit" and read_meta["forget"] == meta["forget"] and read_meta["seed"] == meta["seed"]
    # a bare state dict is exported with the meta its flags describe, and then needs no flags
    torch.save(state, "bare.pth")
    assert run_script("export.py", "bare.pth", "--arch", "vit", "--preset", "smoke") == 0
    assert common.read_weights("bare.safetensors")[1] == {"arch": "vit", "preset": "smoke", "dataset": "cifar10"}
    assert common.load_checkpoint("bare.safetensors")[1]["arch"] == "vit"


def test_finetune_unlearns_from_a_plain_state_dict(original_weights, cifar_dir, workdir):
    original = original_weights("resnet50")
    torch.save(torch.load(original, weights_only=True)["model"], "plain.pth")
    shared = [*SMOKE_RESNET, "--data", cifar_dir, "--device", "cpu"]
    assert run_script("finetune.py", *shared, "--weights", "plain.pth", "--out", "from_plain.pth") == 0
    assert run_script("finetune.py", *shared, "--weights", original, "--out", "from_ours.pth") == 0
    from_plain, meta = common.load_checkpoint("from_plain.pth")
    from_ours = common.load_checkpoint("from_ours.pth")[0].state_dict()
    assert meta["method"] == "finetune" and meta["source_weights"] == "plain.pth"
    before = common.load_checkpoint(original)[0].state_dict()
    changed = [key for key, value in from_plain.state_dict().items() if not torch.equal(value, before[key])]
    assert changed  # it trained
    assert all(torch.equal(value, from_ours[key]) for key, value in from_plain.state_dict().items())


def test_wrappers_and_prefixes_come_off(tmp_path):
    tensor = torch.arange(3.0)
    path = tmp_path / "w.pth"
    for content in ({"x.weight": tensor}, {"model": {"state_dict": {"module.x.weight": tensor}}},
                    {"_orig_mod.module.x.weight": tensor}, {"model_state_dict": {"x.weight": tensor}, "optimizer": {}}):
        torch.save(content, path)
        state, meta = common.read_weights(path)
        assert list(state) == ["x.weight"] and torch.equal(state["x.weight"], tensor) and meta is None
    torch.save({"module.a": tensor, "b": tensor}, path)  # a prefix only some keys share stays
    assert sorted(common.read_weights(path)[0]) == ["b", "module.a"]
    torch.save({"epoch": 3, "best": tensor}, path)
    with pytest.raises(common.UserError, match=r"holds a dict with keys 'epoch', 'best', not a state dict"):
        common.read_weights(path)


def test_the_file_says_what_it_can_and_the_flags_the_rest():
    ours = {"arch": "vit", "preset": "smoke", "dataset": "svhn", "method": "lora"}
    assert common.resolve_meta("p", ours, {"arch": "vit"}) == ours
    assert common.resolve_meta("p", None, {"arch": "vit"}) == {"arch": "vit", "preset": "full", "dataset": "cifar10"}
    assert common.resolve_meta("p", {"arch": "vit"}, {"preset": "smoke", "dataset": "cifar100"}) == \
        {"arch": "vit", "preset": "smoke", "dataset": "cifar100"}
    with pytest.raises(common.UserError, match="its meta says preset smoke, not full as --preset says"):
        common.resolve_meta("p", ours, {"preset": "full"})
    with pytest.raises(common.UserError, match="its meta says dataset svhn, not cifar10 as --dataset says"):
        common.resolve_meta("p", ours, {"dataset": "cifar10"})
    with pytest.raises(common.UserError, match="does not say its arch"):
        common.resolve_meta("p", None, {})
    with pytest.raises(TypeError):
        common.model_from_weights("p", {}, None, dataset_size=3)


def test_the_dataset_describes_a_plain_state_dict_and_our_old_meta_is_cifar10s(tmp_path):
    model = common.build_model("resnet18", "smoke", num_classes=100)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    loaded, meta = common.load_checkpoint(tmp_path / "plain.pth", arch="resnet18", preset="smoke", dataset="cifar100")
    assert meta["dataset"] == "cifar100" and loaded.fc.out_features == 100
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(common.UserError, match="does not fit arch resnet18, preset smoke, dataset cifar10: .*dataset"):
        common.load_checkpoint(tmp_path / "plain.pth", arch="resnet18", preset="smoke")
    # meta of ours written before datasets were named is CIFAR-10's: a flag naming another dataset contradicts it
    common.save_checkpoint(tmp_path / "old.pth", common.build_model("resnet18", "smoke"),
                           {"arch": "resnet18", "preset": "smoke", "method": "original"})
    assert common.load_checkpoint(tmp_path / "old.pth")[1]["dataset"] == "cifar10"
    with pytest.raises(common.UserError, match="its meta says dataset cifar10, not svhn"):
        common.load_checkpoint(tmp_path / "old.pth", dataset="svhn")
