"""Test set-up: GPU tests skip cleanly without CUDA; Triton kernels run in the interpreter on CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported, so that triton.jit builds interpretable kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nvme_dir(tmp_path):
    return str(tmp_path / "nvme")
