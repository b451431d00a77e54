"""Shared pytest settings: offline, deterministic, CPU-only, small thread count (2-core CI box)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see fomo_ray/__init__.py)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller takes one result off a worker's size-1 report queue per poll (2 s by default), so a worker
# that reports twice in a row waits for the next poll, and the controller notices the run's end at a poll: at the
# tests' few steps those waits are most of a run (a 1-worker TorchTrainer run of 2 tasks: 33.8 s -> 25.3 s at 0.2 s).
# Inherited by every Ray process the tests start (in-process clusters and ``ray start`` scenarios alike).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist (scripts/test.sh runs 2 workers), the workers share the cores instead of each taking them all
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


#: the tests that read the session's finished tiny sweep (``tiny_finished_sweep``): one pytest-xdist scope, so that
#: sweep runs once; collection fails if another test reads it (add it here)
TINY_SWEEP_READERS = ("tests/test_api.py", "tests/test_ui_browser.py",
                      "tests/test_sweep.py::test_end_to_end_sweep_with_mlflow")


#: the longest scopes, longest first (from ``--durations`` of a full run under xdist, 2026-12-06): a scheduling
#: hint only; a module stands for each of its tests where they are scopes of their own
LONGEST = ("tests/test_pretrain.py", "tests/test_cluster.py", "tiny_sweep",
           "tests/test_sweep.py::test_an_identical_finished_trial_is_replayed_from_the_trial_cache",
           "tests/test_ray_train.py",
           "tests/test_sweep.py::test_cost_order_and_cooperative_early_stopping_with_the_real_loop",
           "tests/test_sweep.py::test_restore_finishes_only_the_rest_and_a_failed_trial_does_not_stop_the_sweep",
           "tests/test_sweep.py::test_ctrl_c_while_ray_starts_stops_the_sweep_cleanly_and_it_resumes",
           "tests/test_autoscaling.py", "tests/test_preemption.py", "tests/test_ddp.py", "tests/test_sweep_budget.py",
           "tests/test_sweep.py::test_two_node_cluster_runs_trials_on_both_nodes", "tests/test_estimate_cpu_driver.py",
           "tests/test_export.py", "tests/test_sweep.py")


#: modules whose tests are handed out one by one: long tests that share only a cheap module fixture (``ray_local``)
ONE_BY_ONE = ("tests/test_sweep.py",)


def scope_of(nodeid: str) -> str:
    """The pytest-xdist scope of a test: its module (its module-scoped fixtures, e.g. a cluster scenario, run once),
    the test itself in a :data:`ONE_BY_ONE` module, or ``tiny_sweep`` for the tiny sweep's readers."""
    if any(nodeid == r or nodeid.startswith((r + "::", r + "[")) for r in TINY_SWEEP_READERS):
        return "tiny_sweep"
    module = nodeid.split("::")[0]
    return nodeid if module in ONE_BY_ONE else module


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin set up the base temp dir
def pytest_configure(config):
    """One budget cache for the session (``_data_util.budget_cache``), named before pytest-xdist starts its workers
    so that they, and every scenario script they start, inherit it; under pytest's base temp dir, so it goes with it."""
    from _data_util import BUDGET_CACHE_ENV

    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        os.environ.setdefault(BUDGET_CACHE_ENV, str(config._tmp_path_factory.getbasetemp() / "budget_cache"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (scripts/test.sh) hands out whole :func:`scope_of` scopes. (pytest-xdist 3.8's own
    ``loadgroup`` reads ``xdist_group`` marks by rewriting node ids, which pytest 9.2 no longer lets it do, so every
    test would be a scope of its own.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the collection's order (longest first), not most tests first

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByScope(config, log)


def pytest_collection_modifyitems(config, items):
    """The :data:`LONGEST` scopes go first, then the others holding a ``slow`` test, so that under pytest-xdist the
    long ones do not start last and leave a worker idle at the end (a stable sort: each module keeps its order).
    GPU-marked tests run only where CUDA exists (the device check); everywhere else they are skipped."""
    for item in items:
        if "tiny_finished_sweep" in item.fixturenames and scope_of(item.nodeid) != "tiny_sweep":
            raise pytest.UsageError(f"{item.nodeid} reads tiny_finished_sweep: add it to TINY_SWEEP_READERS in "
                                    "tests/conftest.py")
    slow = {scope_of(item.nodeid) for item in items if "slow" in item.keywords}

    def rank(item) -> int:
        scope = scope_of(item.nodeid)
        known = [i for i, name in enumerate(LONGEST) if scope == name or scope.startswith(name + "::")]
        return known[0] if known else len(LONGEST) + (scope not in slow)

    items.sort(key=rank)
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


@pytest.fixture(scope="session")
def tiny_finished_sweep(tmp_path_factory):
    """ONE finished tiny sweep for the whole session, read by tests/test_api.py, tests/test_sweep.py's end-to-end test
    and tests/test_ui_browser.py (each used to run this same sweep of its own): 2 trials (fine-tuning; EMA merge at
    weight 0.5) x 2 tasks of the real loop on random-init fomo-tiny-s (``_data_util.tiny_sweep``), each trial a
    TorchTrainer driven by its Tune trial, tracked in MLflow (every training step logged). Named ``merge_weights``
    like the main job and written under ``<root>/runs`` (the default output directory seen from ``<root>``), so that
    docs/PYTHON_API.md and the README's commands run on it as written.

    Made through the public ``fomo_ray.sweep`` (``.api``: its Results); ``.out`` is the engine's SweepResult of the
    same call (``tune_sweep.run_sweep``'s return value, recorded on the way), ``.spec`` the sweep spec it ran, and
    ``.wall`` its wall time. Tests only read it. Uses the Ray already running (a module's ``ray_local``) or starts
    one and shuts it down again."""
    import time
    from types import SimpleNamespace

    import ray

    import fomo_ray
    from fomo_ray.engine import tune_sweep

    from _data_util import small_fifmini, tiny_sweep

    root = tmp_path_factory.mktemp("tiny_sweep")
    spec = {"name": "merge_weights", "report": {"x": "method.merge.weight"}, "trainer": "train",
            "base": tiny_sweep(small_fifmini(tmp_path_factory).root, root, output_dir=str(root / "runs")),
            "space": {"variant": {"points": {"finetune": {"method.name": "finetune"},
                                             "ema": {"method.name": "ema_merge", "method.merge.weight": 0.5}}}}}
    ran: dict = {}
    real = tune_sweep.run_sweep

    def recorded(sweep_spec, **kwargs):
        ran["spec"], ran["out"] = sweep_spec, real(sweep_spec, **kwargs)
        return ran["out"]

    had_ray = ray.is_initialized()
    t0 = time.time()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tune_sweep, "run_sweep", recorded)
            res = fomo_ray.sweep(spec, progress=False)
        wall = time.time() - t0
    finally:
        if not had_ray and ray.is_initialized():
            ray.shutdown()
    assert list(res.trials["status"]) == ["finished", "finished"] and not res.interrupted
    return SimpleNamespace(api=res, out=ran["out"], spec=ran["spec"], root=root, output_dir=root / "runs", wall=wall)
