"""Reads a tiny subset of the real CIFAR-10 (JPEG copy) when its offline pack lies beside the repository; skips
otherwise."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import common

UNPACKER = ROOT.parent / "shared" / "tools" / "cifar10_unpack.py"
PACK = ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"


@pytest.mark.skipif(not (UNPACKER.is_file() and PACK.is_file()), reason="shared CIFAR-10 pack not present")
def test_real_pack_loads_in_standard_layout(tmp_path):
    subprocess.run([sys.executable, str(UNPACKER), "--out", str(tmp_path), "--pack", str(PACK),
                    "--train-per-class", "4", "--test-per-class", "2"], check=True, capture_output=True, timeout=120)
    data = common.load_data(tmp_path, "cpu")
    assert data.train_images.shape == (40, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [4] * 10
    means = data.train_images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor(common.DATASETS["cifar10"].mean), atol=0.1)
    provenance = (tmp_path / "cifar-10-batches-py" / "PROVENANCE").read_text().strip()
    assert common.data_label(tmp_path) == provenance  # a re-encoded copy names itself, not "CIFAR-10"
