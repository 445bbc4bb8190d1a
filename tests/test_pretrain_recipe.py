"""The optional from-scratch recipe keys (PRETRAIN_OPTIONS): mixup/cutmix on the device and torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

import common
from unlearning import compiling, training

CLASSES = common.DATASETS["cifar10"].num_classes

BATCH = 10  # distinct labels 0..9, so each sample's partner (the reversed batch) has another label


def constant_batch():
    """Sample i is an image whose every pixel is i, labelled i: a mixed pixel tells which samples it came from."""
    labels = torch.arange(BATCH)
    return labels.float().view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous(), labels


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def mixed(seed=0, draws=1, **options):
    g = generator(seed)
    inputs, labels = constant_batch()
    return [common.mix_batch(inputs, labels, g, **options) for _ in range(draws)]


@pytest.mark.parametrize("options", [{"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0},
                                     {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.7}])
def test_mixed_batches_keep_their_shape_and_targets_sum_to_one(options):
    inputs, labels = constant_batch()
    g = generator(0)
    for size in (BATCH, BATCH - 1) * 10:  # an odd batch too (an epoch's last one may be)
        images, targets = common.mix_batch(inputs[:size], labels[:size], g, **options)
        assert images.shape == inputs[:size].shape and images.dtype == inputs.dtype
        assert targets.shape == (size, CLASSES) and (targets >= 0).all()
        assert torch.allclose(targets.sum(1), torch.ones(size))


def test_alpha_zero_is_no_mixing_and_draws_nothing():
    inputs, labels = constant_batch()
    g = generator(0)
    state = g.get_state()
    images, targets = common.mix_batch(inputs, labels, g)
    assert images is inputs and torch.equal(targets, F.one_hot(labels, CLASSES).float())
    assert torch.equal(g.get_state(), state)
    for images, targets in mixed(draws=5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0):
        assert torch.equal(images, inputs) and torch.equal(targets, F.one_hot(labels, CLASSES).float())


def test_same_seed_same_batches_other_seed_other_batches():
    options = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    first, again, other = mixed(0, 5, **options), mixed(0, 5, **options), mixed(1, 5, **options)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_mixup_blends_images_by_the_weight_of_the_targets():
    labels = torch.arange(BATCH)
    for images, targets in mixed(draws=10, mixup_alpha=0.4):
        lam = targets[labels, labels]
        assert torch.allclose(targets[labels, labels.flip(0)], 1 - lam)
        expected = lam * labels + (1 - lam) * labels.flip(0)
        assert torch.allclose(images.mean((1, 2, 3)), expected, atol=1e-5)
        assert torch.allclose(images.amax((1, 2, 3)), images.amin((1, 2, 3)), atol=1e-5)  # whole images blended


def test_cutmix_box_area_is_the_weight_of_the_targets():
    labels = torch.arange(BATCH)
    partial_boxes = 0
    for images, targets in mixed(draws=30, cutmix_alpha=1.0):
        from_partner = images == labels.flip(0).view(-1, 1, 1, 1)
        assert (from_partner | (images == labels.view(-1, 1, 1, 1))).all()  # pasted, not blended
        box = from_partner[0, 0]
        assert all(torch.equal(from_partner[i, c], box) for i in range(BATCH) for c in range(3))
        rows, columns = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):  # one rectangle
            assert box[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all()
            partial_boxes += box.float().mean() < 1
        partner_share = box.float().mean()
        assert torch.allclose(targets[labels, labels.flip(0)], partner_share.expand(BATCH))
        assert torch.allclose(targets[labels, labels], (1 - partner_share).expand(BATCH))
    assert partial_boxes >= 10


def test_switch_prob_picks_cutmix_or_mixup():
    labels = torch.arange(BATCH).view(-1, 1, 1, 1)
    for images, _ in mixed(draws=5, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0):
        assert ((images == labels) | (images == labels.flip(0))).all()
    blended = [((images != labels) & (images != labels.flip(0))).any()
               for images, _ in mixed(draws=5, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0)]
    assert all(blended)


def test_soft_target_loss_is_timms_mixup_with_label_smoothing():
    inputs, labels = constant_batch()
    logits = torch.randn(BATCH, CLASSES, generator=generator(3))
    for _, targets in mixed(draws=3, mixup_alpha=0.8):
        lam = targets[0, 0].item()
        ours = F.cross_entropy(logits, targets, label_smoothing=0.1)
        timms = SoftTargetCrossEntropy()(logits, mixup_target(labels, CLASSES, lam, 0.1))
        assert ours.item() == pytest.approx(timms.item(), rel=1e-6)


def tiny_data():
    g = generator(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % CLASSES
    return common.Data(images, labels, images[:10], labels[:10])


def train_tiny(recipe_changes):
    common.seed_everything(0)
    model = common.build_model("vit", "smoke")
    recipe = dict(common.PRETRAIN_RECIPES["vit"], epochs=2, batch_size=16, **recipe_changes)
    data = tiny_data()
    return common.train_from_scratch(model, data, torch.arange(len(data.train_labels)), recipe, seed=0)


def test_options_at_their_off_values_train_exactly_as_without_them():
    before = train_tiny({}).state_dict()
    off = train_tiny(common.PRETRAIN_OPTIONS).state_dict()
    assert all(torch.equal(before[k], off[k]) for k in before)
    mixed_model = train_tiny({"mixup_alpha": 0.8, "cutmix_alpha": 1.0}).state_dict()
    assert not all(torch.equal(before[k], mixed_model[k]) for k in before)


def test_lr_milestones_divide_the_lr_by_ten_after_their_share_of_the_epochs():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    recipe = dict(common.PRETRAIN_OPTIONS, epochs=5, lr=0.1, lr_milestones=[0.5, 0.75])  # after epochs 2 and 3
    scheduler = training.lr_schedule(optimizer, recipe, steps_per_epoch=3)
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 3 + [0.001] * 6)


SMOKE = ["--arch", "vit", "--preset", "smoke", "--device", "cpu", "--epochs", "2", "--eval-every", "0"]


def test_pretrain_with_mixup_and_cutmix_names_and_records_them(cifar_dir, workdir):
    assert run_script("pretrain.py", *SMOKE, "--data", cifar_dir, "--mixup", "0.8", "--cutmix", "1") == 0
    path = workdir / "model_weights/vit-smoke_original_epochs=2_mixup=0.8_cutmix=1.0.pth"
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["settings"] == {"epochs": "2", "mixup": "0.8", "cutmix": "1.0"}
    assert meta["recipe"]["mixup_alpha"] == 0.8 and meta["recipe"]["cutmix_alpha"] == 1.0
    assert meta["recipe"]["mix_prob"] == 1.0 and meta["recipe"]["compile"] is False
    assert run_script("pretrain.py", *SMOKE, "--data", cifar_dir, "--mixup", "0") == 0
    plain = torch.load(workdir / "model_weights/vit-smoke_original_epochs=2.pth", weights_only=True)["meta"]
    assert plain["settings"] == {"epochs": "2"} and plain["recipe"]["mixup_alpha"] == 0


@pytest.mark.parametrize("flag", ["--mixup", "--cutmix"])
def test_negative_alpha_is_refused_in_one_line(flag, workdir, capsys):
    assert run_script("pretrain.py", *SMOKE, flag, "-0.5") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "number >= 0, got '-0.5'" in error
    assert not (workdir / "model_weights").exists()


def test_compile_trains_the_compiled_model_and_saves_plain_weights(cifar_dir, workdir, monkeypatch):
    # The eager backend captures graphs like inductor but generates no code, so the test takes seconds on a CPU.
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or real_compile(model, **kw))
    assert run_script("retrain.py", *SMOKE, "--data", cifar_dir, "--compile") == 0
    assert compiled == [{"backend": "eager", "dynamic": False}]
    path = workdir / "model_weights/vit-smoke_retrain_epochs=2.pth"  # --compile does not change what is learnt
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["meta"]["recipe"]["compile"] is True and checkpoint["meta"]["settings"] == {"epochs": "2"}
    assert not any("_orig_mod" in key for key in checkpoint["model"])
    common.load_checkpoint(path, arch="vit")
    assert run_script("retrain.py", *SMOKE, "--data", cifar_dir, "--out", "plain.pth") == 0
    plain = torch.load(workdir / "plain.pth", weights_only=True)
    assert len(compiled) == 1 and plain["meta"]["recipe"]["compile"] is False
    assert all(torch.allclose(plain["model"][k], checkpoint["model"][k], atol=1e-5) for k in plain["model"])


def test_compile_without_a_compiler_is_one_line(cifar_dir, workdir, capsys):
    inductor_config = pytest.importorskip("torch._inductor.config")
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        assert run_script("pretrain.py", *SMOKE, "--data", cifar_dir, "--compile", "--out", "x.pth") == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: --compile failed") and "run without --compile" in error
    assert not (workdir / "x.pth").exists()
