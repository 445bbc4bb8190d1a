import subprocess
import sys

import torch
from conftest import ROOT, run_script

import common

CLASSES = common.DATASETS["cifar10"].num_classes


def test_resnet_convs_shrink_by_the_amount_but_classes_stay():
    model = common.build_model("resnet50", "smoke")
    block = model.layer1[0]
    before = {"conv1": model.conv1.out_channels, "inner": block.conv1.out_channels, "out": block.conv3.out_channels,
              "fc_in": model.fc.in_features}
    common.prune(model, 0.5, "physical")
    assert model.conv1.out_channels == before["conv1"] // 2
    assert block.conv1.out_channels == block.conv2.in_channels == before["inner"] // 2
    assert block.conv3.out_channels == block.downsample[0].out_channels == before["out"] // 2
    assert block.bn3.num_features == block.conv3.out_channels
    assert model.fc.in_features == before["fc_in"] // 2 and model.fc.out_features == CLASSES
    assert not common.pruned_layers(model)


def test_vit_prunes_only_mlp_hidden_units():
    model = common.build_model("vit", "smoke")
    embed_dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    common.prune(model, 0.5, "physical")
    for block in model.blocks:
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == hidden // 2
        assert block.mlp.fc2.out_features == embed_dim and block.attn.qkv.weight.shape == (3 * embed_dim, embed_dim)
    assert model.head.weight.shape == (CLASSES, embed_dim)


def test_pruned_model_gives_finite_outputs_and_costs_less():
    for arch in common.ARCHS:
        model = common.build_model(arch, "smoke").eval()
        full = common.model_cost(model)
        common.prune(model, 0.5, "physical")
        with torch.no_grad():
            logits = model(torch.randn(3, 3, 32, 32))
        assert logits.shape == (3, CLASSES) and torch.isfinite(logits).all()
        pruned = common.model_cost(model)
        assert pruned["params"] < full["params"] and pruned["macs"] < full["macs"]


def test_checkpoint_round_trips(tmp_path):
    model = common.prune(common.build_model("resnet50", "smoke"), 0.5, "physical").eval()
    path = tmp_path / "pruned.pth"
    common.save_checkpoint(path, model, {"arch": "resnet50", "preset": "smoke", "prune_mode": "physical"})
    loaded, meta = common.load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert loaded.layer2[0].conv2.weight.shape == model.layer2[0].conv2.weight.shape


def test_pruneft_physical_checkpoint_evaluates(workdir, cifar_dir, original_weights):
    out = workdir / "pruneft.pth"
    assert run_script("pruneft.py", "--arch", "resnet50", "--preset", "smoke", "--data", cifar_dir, "--device", "cpu",
                      "--weights", original_weights("resnet50"), "--prune-mode", "physical", "--out", out) == 0
    row = common.evaluate_checkpoint(out, cifar_dir, "cpu")
    assert all(0 <= row[key] <= 100 for key in common.METRIC_KEYS)
    meta = torch.load(out, weights_only=True)["meta"]
    unpruned = common.model_cost(common.build_model("resnet50", "smoke"))
    assert meta["prune_mode"] == "physical" and meta["prune_amount"] == 0.5
    assert meta["params"] < unpruned["params"] and meta["macs"] < unpruned["macs"]


def test_loraprune_physical_runs_end_to_end(workdir, cifar_dir, original_weights):
    out = workdir / "loraprune.pth"
    assert run_script("loraprune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--device", "cpu",
                      "--weights", original_weights("vit"), "--prune-mode", "physical", "--out", out) == 0
    model, meta = common.load_checkpoint(out)
    assert meta["prune_mode"] == "physical" and meta["lora"] is not None
    hidden = common.build_model("vit", "smoke").blocks[0].mlp.fc1.out_features
    assert model.blocks[0].mlp.fc1.out_features == hidden // 2
    assert run_script("evaluate.py", out, "--data", cifar_dir, "--device", "cpu") == 0


def test_without_torch_pruning_costs_count_params_and_physical_mode_is_one_line(monkeypatch, workdir, cifar_dir,
                                                                                 original_weights, capsys):
    model = common.build_model("vit", "smoke")
    with_macs = common.model_cost(model)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # makes `import torch_pruning` raise ImportError
    assert common.model_cost(model) == {"params": with_macs["params"], "macs": None}
    assert run_script("pruneft.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--device", "cpu",
                      "--weights", original_weights("vit"), "--prune-mode", "physical") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --prune-mode physical needs torch-pruning: pip install") and err.count("\n") == 1
    assert not (workdir / "model_weights").exists()


def test_every_script_imports_without_torch_pruning_or_submitit():
    """A machine without torch-pruning (or submitit, which only --launcher slurm needs) still runs everything but
    physical pruning: nothing imports them up front."""
    code = ("import sys; sys.modules['torch_pruning'] = sys.modules['submitit'] = None; "
            "sys.path.insert(0, sys.argv[1]); import common, bench, reproduce; "
            "from unlearning import launch, representation, sweep; "
            "print(common.model_cost(common.build_model('vit', 'smoke'))['macs'])")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
