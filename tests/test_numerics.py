"""mg.numerics.exact_gpu: a scoped switch, restored on exit and on error."""

import pytest
import torch

import metagrad as mg


def flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic)


def test_exact_gpu_is_scoped():
    before = flags()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with mg.numerics.exact_gpu():
            assert flags() == (False, False, True) and not mg.numerics.tf32_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with pytest.raises(KeyError):
            with mg.numerics.exact_gpu():
                raise KeyError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic) = before
