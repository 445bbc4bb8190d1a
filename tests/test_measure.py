import pytest
import torch

import common
from unlearning import measure

MB = 2**20


class FakeAllocator:
    """torch.cuda's memory statistics over a counter, so Measure's arithmetic runs without a GPU."""

    def __init__(self, allocated):
        self.allocated = self.peak = allocated
        self.events = []

    def allocate(self, size):
        self.allocated += size
        self.peak = max(self.peak, self.allocated)

    def reset_peak(self, device=None):
        self.events.append("reset")
        self.peak = self.allocated


@pytest.fixture
def allocator(monkeypatch):
    fake = FakeAllocator(100 * MB)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    monkeypatch.setattr(measure.gc, "collect", lambda: fake.events.append("gc"))
    return fake


def test_peak_memory_is_above_what_was_resident_and_spans_both_blocks(allocator):
    measure = common.Measure("cuda")
    with measure:  # unlearn(): keeps 10 MB (adapters), briefly 15 MB
        allocator.allocate(15 * MB)
        allocator.allocate(-5 * MB)
    allocator.allocate(50 * MB)  # the untimed warm-up between the blocks leaves 5 MB behind (a workspace)
    allocator.allocate(-45 * MB)
    with measure:  # fit(): 40 MB at its peak, 2 MB left
        allocator.allocate(40 * MB)
        allocator.allocate(-38 * MB)
    assert measure.baseline_gpu_mem_mb == 100
    assert measure.peak_gpu_mem_mb == 10 + 40  # the warm-up's 5 MB and the 100 MB resident are not counted
    assert allocator.events == ["gc", "reset", "gc", "reset"]  # garbage collected before each reset
    assert measure.seconds > 0


def test_on_a_cpu_no_memory_is_reported():
    with common.Measure("cpu") as measure:
        pass
    assert measure.peak_gpu_mem_mb is None and measure.baseline_gpu_mem_mb is None and measure.seconds >= 0
