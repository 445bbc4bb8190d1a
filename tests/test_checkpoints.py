import pytest
import torch

import common

CLASSES = common.DATASETS["cifar10"].num_classes


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model = common.build_model("vit", "smoke")
    meta = {"arch": "vit", "preset": "smoke", "dataset": "cifar10", "method": "finetune",
            "forget": common.ForgetSpec((3, 5)).to_dict(), "rte_s": 1.5, "peak_gpu_mem_mb": None,
            "versions": common.library_versions()}
    path = tmp_path / "m.pth"
    common.save_checkpoint(path, model, meta)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"] == meta
    loaded, loaded_meta = common.load_checkpoint(path)
    assert loaded_meta == meta
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary file left behind


def test_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    common.save_checkpoint(path, common.build_model("vit", "smoke"), {"arch": "vit", "preset": "smoke"})
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, common.build_model("vit", "smoke"), {"arch": "vit", "preset": "smoke"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_loading_the_other_arch_is_a_user_error(tmp_path):
    path = tmp_path / "m.pth"
    common.save_checkpoint(path, common.build_model("vit", "smoke"), {"arch": "vit", "preset": "smoke"})
    with pytest.raises(common.UserError, match="its meta says arch vit, not resnet50 as --arch says"):
        common.load_checkpoint(path, arch="resnet50")


def test_foreign_file_is_a_user_error(tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="not a checkpoint"):
        common.load_checkpoint(path)


def test_full_models_have_the_expected_size():
    assert 23.4e6 < common.count_parameters(common.build_model("resnet50")) < 23.6e6
    vit = common.build_model("vit")
    assert 21.0e6 < common.count_parameters(vit) < 21.8e6
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, CLASSES)
