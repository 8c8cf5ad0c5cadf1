"""Test-wide setup. Kernel tests on CPU run Triton through its interpreter, which must be chosen before triton loads."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def triton_bounds_checked():
    """Every interpreted kernel launch of a test has its loads and stores checked against the launch's tensors
    (tests/triton_bounds.py): the interpreter would otherwise read and write stray host memory where a GPU faults.
    Costs nothing in tests without interpreted kernels. LCTRAIN_UNCHECKED_BOUNDS=1 turns it off (to time it)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LCTRAIN_UNCHECKED_BOUNDS") == "1":
        yield
        return
    from triton_bounds import checked_bounds

    with checked_bounds():
        yield


def pytest_collection_modifyitems(config, items):
    """GPU tests are marked and skip where no CUDA device is present (the CPU CI); they run through the device tool."""
    gpus = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2 or more CUDA GPUs"))


@pytest.fixture(scope="session")
def parallel_1():
    """A one-process gloo group with megatron-core's model-parallel state (tensor/context parallel size 1)."""
    from lctrain.parallel.groups import init_parallel

    return init_parallel()
