import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script
from torch import nn

import common

CLASSES = common.DATASETS["cifar10"].num_classes

SMOKE = ["--arch", "vit", "--preset", "smoke", "--device", "cpu"]


def unlearn(script, original_weights, cifar_dir, out, *extra):
    assert run_script(script, *SMOKE, "--data", cifar_dir, "--weights", original_weights("vit"), "--out", out,
                      *extra) == 0
    return out


def forget_loss(path, cifar_dir):
    """Mean cross-entropy of a checkpoint on the default forget set (class 3), in eval mode."""
    model, _ = common.load_checkpoint(path)
    data = common.load_data(cifar_dir, "cpu", "smoke")
    forget_idx = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec()).forget_idx
    probs = common.predict(model, data.train_images, forget_idx)
    return F.nll_loss(probs.log(), data.train_labels[forget_idx]).item()


@pytest.mark.parametrize("script, forget, tag, paper_lr", [
    ("ga.py", [], "class3", 1e-4),
    ("rl.py", ["--forget-class", "3", "5"], "class3-5", 0.013),
    ("l1sparse.py", ["--forget-random", "0.1"], "random10", 0.01),
    ("salun.py", ["--forget-class", "3", "5"], "class3-5", 0.013),
    ("scrub.py", ["--forget-random", "0.1"], "random10", 5e-4),
])
def test_baseline_runs_and_evaluate_reads_its_checkpoint(script, forget, tag, paper_lr, original_weights, cifar_dir,
                                                         workdir):
    out = unlearn(script, original_weights, cifar_dir, workdir / "unlearned.pth", *forget)
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["method"] == script.removesuffix(".py") and meta["epochs"] == common.SMOKE["epochs"]
    assert meta["lr"] == paper_lr
    assert run_script("evaluate.py", out, "--data", cifar_dir, "--json", "eval.json") == 0
    [row] = json.loads((workdir / "eval.json").read_text())
    assert row["forget"] == tag and row["method"] == meta["method"]
    assert all(0 <= row[key] <= 100 for key in common.METRIC_KEYS)


@pytest.mark.parametrize("saliency, step_lr", [("paper", None), ("stepped", 0.01)])
def test_salun_mask_holds_the_share_and_training_moves_nothing_outside_it(saliency, step_lr, original_weights,
                                                                          cifar_dir, workdir):
    out = unlearn("salun.py", original_weights, cifar_dir, workdir / "salun.pth", "--saliency", saliency)
    original, _ = common.load_checkpoint(original_weights("vit"))
    unlearned = torch.load(out, weights_only=True)
    assert unlearned["meta"]["hyperparameters"]["saliency"] == saliency
    data = common.load_data(cifar_dir, "cpu", "smoke")
    splits = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec())
    forget = common.Batches(data.train_images, data.train_labels, splits.forget_idx, common.SMOKE["batch_size"])
    mask = common.saliency_mask(original, forget, 0.5, step_lr)
    weights = sum(keep.numel() for keep in mask.values())
    assert sum(keep.sum().item() for keep in mask.values()) == round(0.5 * weights)
    assert unlearned["meta"]["hyperparameters"]["masked_weights"] == round(0.5 * weights)
    before = dict(original.named_parameters())
    moved = 0
    for name, keep in mask.items():
        after = unlearned["model"][name]
        assert torch.equal(after[~keep], before[name].detach()[~keep]), name
        moved += (after[keep] != before[name].detach()[keep]).sum().item()
    assert moved > 0


def test_saliency_mask_share_is_exact_on_a_tiny_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, CLASSES))
    batches = [(torch.randn(5, 3, 4, 4), torch.randint(0, CLASSES, (5,))) for _ in range(2)]
    mask = common.saliency_mask(model, batches, 0.3)
    total = sum(p.numel() for p in model.parameters())
    assert sum(keep.sum().item() for keep in mask.values()) == round(0.3 * total)
    assert all(keep.shape == p.shape for keep, p in zip(mask.values(), model.parameters(), strict=True))


def test_stepped_saliency_follows_the_sgd_path_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, CLASSES))
    batches = [(torch.randn(5, 3, 4, 4), torch.randint(0, CLASSES, (5,))) for _ in range(4)]
    start = copy.deepcopy(model.state_dict())
    paper = common.saliency_mask(model, batches, 0.3)
    at_start = common.saliency_mask(model, batches, 0.3, step_lr=0.0)  # steps of size 0 never leave the start
    assert all(torch.equal(paper[name], at_start[name]) for name in paper)
    stepped = common.saliency_mask(model, batches, 0.3, step_lr=1.0)
    assert all(torch.equal(tensor, start[name]) for name, tensor in model.state_dict().items())
    total = sum(p.numel() for p in model.parameters())
    assert sum(keep.sum().item() for keep in stepped.values()) == round(0.3 * total)
    assert not all(torch.equal(paper[name], stepped[name]) for name in paper)


def test_random_labels_are_never_the_true_label():
    labels = torch.arange(CLASSES).repeat(500)
    relabelled = common.random_other_labels(labels, torch.Generator().manual_seed(0))
    assert (relabelled != labels).all()
    for c in range(CLASSES):  # every other class is drawn
        assert set(relabelled[labels == c].tolist()) == set(range(CLASSES)) - {c}


def test_rl_batches_relabel_only_the_forget_set():
    labels = torch.arange(CLASSES).repeat(12)
    images = torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)
    forget_idx = torch.nonzero(labels == 3).flatten()
    retain_idx = torch.nonzero(labels != 3).flatten()
    batches = common.RandomLabelBatches(common.Batches(images, labels, forget_idx, 5),
                                        common.Batches(images, labels, retain_idx, 16))
    for _ in range(3):
        seen = [batch_labels for _, batch_labels in batches]
        assert len(seen) == len(batches)
        forget_labels, retain_labels = torch.cat(seen[:3]), torch.cat(seen[3:])
        assert len(forget_labels) == len(forget_idx) and (forget_labels != 3).all()
        assert sorted(retain_labels.tolist()) == sorted(labels[retain_idx].tolist())


def test_ga_raises_the_forget_loss(original_weights, cifar_dir, workdir):
    out = unlearn("ga.py", original_weights, cifar_dir, workdir / "ga.pth", "--lr", "0.01", "--epochs", "2")
    assert torch.load(out, weights_only=True)["meta"]["lr"] == 0.01
    assert forget_loss(out, cifar_dir) > forget_loss(original_weights("vit"), cifar_dir) + 0.1


def test_l1_penalty_shrinks_the_weights(original_weights, cifar_dir, workdir):
    plain = unlearn("l1sparse.py", original_weights, cifar_dir, workdir / "plain.pth", "--l1-alpha", "0")
    sparse = unlearn("l1sparse.py", original_weights, cifar_dir, workdir / "sparse.pth", "--l1-alpha", "1e-3")
    l1 = {path: common.l1_norm(common.load_checkpoint(path)[0]).item() for path in (plain, sparse)}
    assert l1[sparse] < l1[plain]


def test_distill_kl_is_zero_only_when_student_matches_teacher():
    logits = torch.randn(4, CLASSES)
    assert common.distill_kl(logits, logits, 4.0).item() == pytest.approx(0, abs=1e-6)
    assert common.distill_kl(logits, logits.flip(1), 4.0).item() > 0


def test_l1_norm_and_its_gradient_match_the_per_parameter_sum():
    torch.manual_seed(0)
    model = common.build_model("resnet50", "smoke").train()
    with torch.no_grad():
        model.conv1.weight[0] = 0  # sign(0) = 0, as the gradient of |w| at 0
    inputs, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    start = copy.deepcopy(model.state_dict())
    per_parameter = sum(p.abs().sum() for p in model.parameters())
    assert torch.allclose(common.l1_norm(model), per_parameter, rtol=1e-6, atol=0)
    for weight in (1e-4, 0.37):
        model.load_state_dict(start)  # the same BatchNorm statistics for both passes
        (common.cross_entropy(model, inputs, labels) + weight * sum(p.abs().sum() for p in model.parameters())
         ).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        model.load_state_dict(start)
        common.cross_entropy(model, inputs, labels).backward()
        common.add_l1_gradient(list(model.parameters()), weight)
        assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected, strict=True))
        model.zero_grad(set_to_none=True)


def test_saliency_sums_the_forget_gradients_per_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, CLASSES))
    batches = [(torch.randn(5, 3, 4, 4), torch.randint(0, CLASSES, (5,))) for _ in range(3)]
    summed = [torch.zeros_like(p) for p in model.parameters()]
    for inputs, labels in batches:
        model.zero_grad()
        (-common.cross_entropy(model, inputs, labels)).backward()
        for total, p in zip(summed, model.parameters(), strict=True):
            total += p.grad
    flat = torch.cat([s.abs().flatten() for s in summed])
    threshold = flat.sort(descending=True).values[round(0.3 * flat.numel()) - 1]
    mask = common.saliency_mask(model, batches, 0.3)
    for keep, total in zip(mask.values(), summed, strict=True):
        assert torch.equal(keep, total.abs() >= threshold)
