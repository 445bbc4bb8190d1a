import copy
import json

import pytest
import torch
from conftest import run_script, write_synthetic_cifar
from torch import nn

import common
from unlearning import representation

CLASSES = common.DATASETS["cifar10"].num_classes

FORGET = common.ForgetSpec((3,))


class ColourNet(nn.Module):
    """Mean colour -> 32 ReLU features -> classifier `fc`: learns the synthetic classes perfectly."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 32), nn.ReLU())
        self.fc = nn.Linear(32, CLASSES)

    def colours(self, x):
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(self.colours(x)))


class ConfusedNet(ColourNet):
    """A trained ColourNet whose features no longer know class 3: each image of that colour is given the mean
    colour of another class (which one is fixed by the image's noise), as a model that forgot cats sees them."""

    def __init__(self, trained, centres):
        super().__init__()
        self.load_state_dict(trained.state_dict())
        self.register_buffer("centres", centres)

    def colours(self, x):
        colours = x.mean((2, 3))
        is_forgotten = torch.cdist(colours, self.centres).argmin(1) == FORGET.classes[0]
        others = torch.tensor([c for c in range(CLASSES) if c not in FORGET.classes])
        stand_in = others[(x[:, 0, 0, 0] * 1000).long() % len(others)]
        return torch.where(is_forgotten[:, None], self.centres[stand_in], colours)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_synthetic_cifar(tmp_path_factory.mktemp("cifar50"), train_per_class=50, test_per_class=50)
    return common.load_data(root, "cpu")


@pytest.fixture(scope="module")
def splits(data):
    return common.make_splits(data.train_labels, data.test_labels, FORGET)


@pytest.fixture(scope="module")
def models(data):
    """The original (trained to 100 %), one whose head drops class 3, one whose features lost it."""
    torch.manual_seed(0)
    original = ColourNet()
    inputs, labels = common.normalize(data.train_images), data.train_labels
    optimizer = torch.optim.Adam(original.parameters(), 1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(original(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (original(inputs).argmax(1) == labels).all()
    head_only = copy.deepcopy(original)
    with torch.no_grad():
        head_only.fc.weight[3] = 0
        head_only.fc.bias[3] = 0
    centres = torch.stack([original.colours(inputs)[labels == c].mean(0) for c in range(CLASSES)])
    return {"original": original, "head_only": head_only, "confused": ConfusedNet(original, centres)}


def test_both_unlearned_models_look_perfect_from_their_outputs(models, data, splits):
    for name in ("head_only", "confused"):
        metrics = common.evaluate_model(models[name], data, splits)
        assert metrics["UA"] == 100 and metrics["RA"] > 99 and metrics["TA"] > 99, name


def test_probe_sees_the_class_a_head_dropped_but_not_one_the_features_lost(models, data, splits):
    original = representation.probe_ua(models["original"], data, splits, FORGET)
    head_only = representation.probe_ua(models["head_only"], data, splits, FORGET)
    confused = representation.probe_ua(models["confused"], data, splits, FORGET)
    assert original["probe_UA"] < 5 and head_only["probe_UA"] < 5
    assert confused["probe_UA"] > 90
    assert min(original["probe_TA"], head_only["probe_TA"], confused["probe_TA"]) > 95  # the probe itself works


def test_probe_on_a_random_subset_scores_the_held_out_forget_images(models, data):
    spec = common.ForgetSpec((), 0.1)
    splits = common.make_splits(data.train_labels, data.test_labels, spec)
    assert representation.probe_ua(models["head_only"], data, splits, spec)["probe_UA"] < 5
    cats = (data.train_labels[splits.forget_idx] == 3).float().mean().item() * 100
    assert representation.probe_ua(models["confused"], data, splits, spec)["probe_UA"] == pytest.approx(cats, abs=2)


def test_cka_to_the_original_is_one_for_untouched_features_and_lower_for_lost_ones(models, data, splits):
    head_only = representation.feature_similarity(models["head_only"], models["original"], data, splits)
    confused = representation.feature_similarity(models["confused"], models["original"], data, splits)
    assert head_only == pytest.approx({"CKA_forget": 1, "CKA_retain": 1})
    assert confused["CKA_forget"] < 0.5 and confused["CKA_retain"] == pytest.approx(1)


def test_hidden_class_relearns_fast_lost_one_does_not(models, data, splits):
    def relearn(name):
        return representation.relearn_time(models[name], models["original"], data, splits, fraction=0.05,
                                           max_steps=300)
    assert relearn("original")["relearn_steps"] == 0
    head_only = relearn("head_only")
    assert head_only["relearn_reached"] and 0 < head_only["relearn_steps"] <= 150
    assert head_only["relearn_images"] == 2 * round(0.05 * 50)
    confused = relearn("confused")
    assert confused["relearn_reached"] is False and confused["relearn_steps"] is None
    assert representation.for_table(confused)["relearn_steps"] == "> 300"


def test_relearning_leaves_the_model_untouched(models, data, splits):
    before = copy.deepcopy(models["head_only"].state_dict())
    representation.relearn_time(models["head_only"], models["original"], data, splits, max_steps=10)
    after = models["head_only"].state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_linear_cka_invariances():
    generator = torch.Generator().manual_seed(0)
    for n, width in ((200, 16), (16, 64)):  # the feature-space and the Gram-matrix branch
        x = torch.randn(n, width, generator=generator)
        rotation, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
        assert representation.linear_cka(x, x) == pytest.approx(1)
        assert representation.linear_cka(x, 3 * x @ rotation + 5) == pytest.approx(1)
    x, y = torch.randn(500, 8, generator=generator), torch.randn(500, 8, generator=generator)
    assert representation.linear_cka(x, y) < 0.1
    narrower = x[:, :4]  # different widths, as with a physically pruned model
    assert 0 < representation.linear_cka(x, narrower) < 1
    assert representation.linear_cka(x, torch.ones(500, 3)) != representation.linear_cka(x, torch.ones(500, 3))


@pytest.mark.parametrize("arch", common.ARCHS)
@pytest.mark.parametrize("mode", [None, "physical"])
def test_features_are_the_classifier_input(arch, mode):
    torch.manual_seed(0)
    model = common.build_model(arch, "smoke")
    if mode:
        common.prune(model, 0.5, mode)
    model.eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    features = representation.penultimate_features(model, images, torch.arange(5), batch_size=2)
    x = common.normalize(images)
    if arch == "vit":
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    elif arch == "vgg16_bn":  # the input of the last of the classifier's three linear layers
        expected = model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))
    else:
        stem = model.relu(model.bn1(model.conv1(x)))
        expected = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(stem))))), 1)
    assert features.shape == (5, representation.classifier(model).in_features)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(representation.classifier(model)(features), model(x))


@pytest.fixture(scope="module")
def finetuned(original_weights, cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "finetune.pth"
    assert run_script("finetune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir,
                      "--weights", original_weights("vit"), "--out", out) == 0
    return out


def test_evaluate_reports_the_metrics_and_where_the_original_came_from(finetuned, original_weights, cifar_dir,
                                                                       workdir, capsys):
    original = original_weights("vit")
    assert run_script("evaluate.py", finetuned, original, "--data", cifar_dir, "--probe", "--cka", "--relearn",
                      "--relearn-max-steps", "20", "--json", "eval.json") == 0
    assert "Probe-UA %" in capsys.readouterr().out
    method, itself = json.loads((workdir / "eval.json").read_text())
    assert method["original_weights"] == str(original) and "source_weights" in method["original_from"]
    assert itself["original_weights"] == str(original) and itself["original_from"] == "the checkpoint itself"
    assert itself["CKA_forget"] == pytest.approx(1) and itself["relearn_steps"] == 0
    for row in (method, itself):
        assert 0 <= row["probe_UA"] <= 100 and -1e-9 <= row["CKA_retain"] <= 1 + 1e-9
        assert row["relearn_max_steps"] == 20


def test_missing_original_gives_none_with_a_note(finetuned, cifar_dir, workdir):
    model, meta = common.load_checkpoint(finetuned)
    moved = workdir / "moved.pth"
    common.save_checkpoint(moved, model, {**meta, "source_weights": str(workdir / "gone.pth")})
    row = representation.evaluate_checkpoint(moved, cifar_dir, "cpu", cka=True, relearn=True)
    assert row["CKA_forget"] is None and row["relearn_steps"] is None and row["original_weights"] is None
    assert "--original" in row["original_from"]


def test_original_flag_is_used_for_its_arch_only(finetuned, original_weights, cifar_dir, workdir):
    model, meta = common.load_checkpoint(finetuned)
    moved = workdir / "moved.pth"
    common.save_checkpoint(moved, model, {**meta, "source_weights": None})
    originals = (str(original_weights("resnet50")), str(original_weights("vit")))
    row = representation.evaluate_checkpoint(moved, cifar_dir, "cpu", cka=True, originals=originals)
    assert row["original_weights"] == originals[1] and row["original_from"] == "--original"


@pytest.mark.parametrize("flags, status, message", [
    (["--relearn-fraction", "1.5"], 2, "--relearn-fraction: expected a number > 0 and < 1"),
    (["--relearn-max-steps", "0"], 2, "--relearn-max-steps: expected an integer >= 1"),
    (["--original", "nowhere.pth"], 1, "no checkpoint there"),
])
def test_bad_flags_are_one_line(flags, status, message, finetuned, cifar_dir, workdir, capsys):
    assert run_script("evaluate.py", finetuned, "--data", cifar_dir, "--relearn", *flags) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
