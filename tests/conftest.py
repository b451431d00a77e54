"""Shared pytest settings: offline, deterministic, CPU-only, small thread count (2-core CI box)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see fomo_ray/__init__.py)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where CUDA exists (the device check); everywhere else they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs, a small object store) shared by a module's tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_stray_ray(request):
    """A test that starts Ray without a Ray fixture (``ray.get_runtime_context()`` and friends start a local instance
    on their own) would leave it running for every later test: fail that test, by name, and shut the instance down."""
    import sys

    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    yield
    ray = sys.modules.get("ray")
    if before or not (ray and ray.is_initialized()):
        return
    if any("ray" in name or "cluster" in name for name in request.fixturenames):
        return  # a Ray fixture owns it
    ray.shutdown()
    pytest.fail(f"{request.node.nodeid} left a Ray instance running (started outside a Ray fixture)")
