"""Shared fixtures: a real local Ray cluster (2 CPUs) and CUDA-gated tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing: gpu tests cannot run either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from edsft.distributed.session import pin_address

        pin_address()
    yield ray
    # left running for other modules; ray shuts down at interpreter exit


@pytest.fixture(scope="session")
def le():
    """benchmarks/label_efficiency.py as a module (a script, not part of the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "label_efficiency.py"
    spec = importlib.util.spec_from_file_location("label_efficiency", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["label_efficiency"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
