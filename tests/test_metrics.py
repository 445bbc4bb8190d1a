import json

import numpy as np
import pytest
import torch
from conftest import run_script
from torch import nn

import common
from unlearning import training

CLASSES = common.DATASETS["cifar10"].num_classes


class ConstantModel(nn.Module):
    """Answers the same class for every image."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(len(x), CLASSES) + self.dummy
        logits[:, self.answer] = 10.0
        return logits


class MeanColourModel(nn.Module):
    """Nearest class palette colour: near-perfect on the synthetic data."""

    def __init__(self, data):
        super().__init__()
        colours = common.normalize(data.train_images).mean((2, 3))
        self.centres = nn.Parameter(torch.stack([colours[data.train_labels == c].mean(0) for c in range(10)]))

    def forward(self, x):
        return -torch.cdist(x.mean((2, 3)), self.centres) * 10


@pytest.fixture(scope="module")
def data(cifar_dir):
    return common.load_data(cifar_dir, "cpu")


def splits_for(data, *classes):
    return common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec(classes))


def test_model_that_always_answers_the_forget_class(data):
    metrics = common.evaluate_model(ConstantModel(3), data, splits_for(data, 3))
    assert metrics["UA"] == 0  # it "remembers" every forget image
    assert metrics["RA"] == 0
    assert metrics["TA"] == 0  # the test set holds no cats


def test_model_that_never_answers_the_forget_class(data):
    metrics = common.evaluate_model(ConstantModel(0), data, splits_for(data, 3))
    assert metrics["UA"] == 100
    assert metrics["RA"] == pytest.approx(100 / 9)
    assert metrics["TA"] == pytest.approx(100 / 9)


def test_accurate_model_has_high_ra_and_ta_and_low_ua(data):
    metrics = common.evaluate_model(MeanColourModel(data), data, splits_for(data, 3, 5))
    assert metrics["RA"] > 90 and metrics["TA"] > 90 and metrics["UA"] < 10


def test_mia_efficacy_separates_member_like_from_non_member_like_forget_sets():
    rng = np.random.default_rng(0)
    retain = rng.uniform(0.9, 1.0, 500)   # members: confident
    test = rng.uniform(0.0, 0.5, 500)     # non-members: unsure
    assert common.mia_efficacy(retain, test, rng.uniform(0.9, 1.0, 200)) < 5
    assert common.mia_efficacy(retain, test, rng.uniform(0.0, 0.5, 200)) > 95


def test_mia_efficacy_balances_members_and_non_members(monkeypatch):
    import sklearn.svm  # what mia_efficacy imports when it runs
    fitted = {}

    class RecordingSVC(sklearn.svm.SVC):
        def fit(self, features, labels):
            fitted["counts"] = np.bincount(labels.astype(int)).tolist()
            return super().fit(features, labels)

    monkeypatch.setattr(sklearn.svm, "SVC", RecordingSVC)
    common.mia_efficacy(np.linspace(0.5, 1, 900), np.linspace(0, 0.5, 120), np.ones(10), max_samples=100)
    assert fitted["counts"] == [100, 100]


def test_predict_runs_in_fp32_even_where_training_uses_bf16_autocast(data, monkeypatch):
    seen = []

    class MeanColourLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, CLASSES)

        def forward(self, x):
            logits = self.linear(x.mean((2, 3)))
            seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
            return logits

    # Make training's autocast active on this CPU, as it is on a GPU: predict must not enter it.
    monkeypatch.setattr(training, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    model = MeanColourLinear()
    with training.autocast("cpu"):
        model(common.normalize(data.test_images[:2]))
    assert seen == [(True, torch.bfloat16)]  # the patch is in force
    seen.clear()
    probs = common.predict(model, data.test_images, torch.arange(len(data.test_labels)), batch_size=64)
    assert probs.dtype == torch.float32
    assert seen == [(False, torch.float32)] * 2


def test_evaluate_and_evaluate_checkpoint_draw_the_mia_with_the_checkpoints_seed(original_weights, cifar_dir,
                                                                                 workdir):
    model, meta = common.load_checkpoint(original_weights("vit"))
    path = workdir / "seed3.pth"
    common.save_checkpoint(path, model, {**meta, "seed": 3})

    def mia(*flags):
        assert run_script("evaluate.py", path, "--data", cifar_dir, "--device", "cpu", "--json", "eval.json",
                          *flags) == 0
        return json.loads((workdir / "eval.json").read_text())[0]["MIA_efficacy"]

    recorded = common.evaluate_checkpoint(path, cifar_dir, "cpu")["MIA_efficacy"]
    assert recorded == common.evaluate_checkpoint(path, cifar_dir, "cpu", seed=3)["MIA_efficacy"]
    assert mia() == recorded
    seed0 = common.evaluate_checkpoint(path, cifar_dir, "cpu", seed=0)["MIA_efficacy"]
    assert mia("--seed", "0") == seed0 != recorded
