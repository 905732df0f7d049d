"""metagrad.memory: the peak-memory context manager sees a large allocation in its block."""

import pytest
import torch

from metagrad.memory import PeakMemory, peak_memory

MB = 10**6


def test_cpu_block_allocating_200_mb_reports_at_least_150_mb() -> None:
    with peak_memory("cpu") as mem:
        block = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, touched by ones()
        del block  # freed before the block ends: the *peak* must still see it
    assert mem.method in ("proc_vmhwm", "ru_maxrss")
    assert mem.peak_bytes is not None and mem.peak_bytes >= 150 * MB, mem
    assert mem.peak_mib == pytest.approx(mem.peak_bytes / 2**20)
    assert "CPU process memory" in mem.description


def test_cpu_empty_block_reports_little() -> None:
    with PeakMemory("cpu") as mem:
        pass
    assert mem.peak_bytes is not None and mem.peak_bytes < 50 * MB, mem


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_block_allocating_200_mb_reports_it() -> None:
    with peak_memory("cuda") as mem:
        block = torch.ones(50_000_000, dtype=torch.float32, device="cuda")
        del block
    assert mem.method == "cuda_max_memory_allocated"
    assert mem.peak_bytes is not None and mem.peak_bytes >= 200 * MB


def test_fallback_without_clear_refs_says_it_is_a_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import metagrad.memory as memory

    monkeypatch.setattr(memory, "_clear_refs_writable", lambda: False)
    with peak_memory("cpu") as mem:
        block = torch.ones(1_000_000)
        del block
    assert mem.method == "ru_maxrss"
    assert "lower bound" in mem.description
    assert mem.peak_bytes is not None and mem.peak_bytes >= 0


@pytest.mark.parametrize("text,size", [("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1.5 GiB", 3 * 2**29),
                                       ("64kib", 64 * 2**10), ("4096", 4096), (123, 123)])
def test_parse_bytes(text, size) -> None:
    from metagrad.memory import parse_bytes

    assert parse_bytes(text, "x") == size
