"""A run's deployed model out to open_clip (fomo_ray/results/export.py): the ``model/`` a ``fomo-ray run`` writes loads
into plain open_clip (by name and from its directory, in a process without fomo_ray) with the loop's own deployed
features; every registered method exports a strictly loading state dict equal to what it deploys (merges: the merged
model, peft: adapters merged in); ``fomo-ray export`` and its errors; MLflow sources; ``ray.keep_checkpoints``; and
(marked ``ray``) a finished sweep trial that logs ``model/`` and whose checkpoint tag points at its checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fomo_ray.results import export as ex
from fomo_ray.core.assembly import build_run, run_name
from fomo_ray.core.checkpoint import LOOP_STATE_FILE, load_state, restore
from fomo_ray.cli import export as export_cli
from fomo_ray.cli import run as run_cli
from fomo_ray.config import ConfigError, load_config
from fomo_ray.core.loop import RunHooks, deployed, run_stream
from fomo_ray.methods import REGISTRY
from fomo_ray.methods.merging import MERGE_PRESETS

from _data_util import FEW_DOP_STEPS, small_fifmini, tiny_config

ARCH = "fomo-tiny-s"
PEFT = ("lora", "dora", "vera")


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return small_fifmini(tmp_path_factory).root


def _cfg(bench_root, out: Path, **overrides):
    return tiny_config(bench_root, out, **{
        "evaluation.every_n_tasks": 2, "method.reg.ewc_fisher_batches": 1,
        "optimizer.lr": 1e-2,  # large enough that four steps move every method's deployed features visibly
        **overrides})


def _overrides(cfg) -> list[str]:
    return [f"{k}={v}" for k, v in cfg.flat().items() if not isinstance(v, tuple)]


def _probe():
    """Fixed images (already normalised, at the model's 32 px) and token ids of three captions."""
    import open_clip

    from fomo_ray.models.backbones import register_tiny_archs

    register_tiny_archs()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(ARCH)(["a photo of a red circle", "three squares", "a letter"])
    return images, tokens


@torch.no_grad()
def _features(model, images, tokens) -> torch.Tensor:
    """Image and text features, unnormalised. Parameters are frozen first: whether they require grad selects
    another attention kernel in torch (a last-bit difference that says nothing about the weights)."""
    model.eval().requires_grad_(False)
    return torch.cat([model.encode_image(images), model.encode_text(tokens)])


def _loop_features(cfg, state, images, tokens) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(theta_0 features, features of the loop's own deployed model after ``state``, its deployed weights): the run
    rebuilt by assembly.build_run, restored by checkpoint.restore, deployed weights swapped in by loop.deployed."""
    run = build_run(cfg, "cpu")
    before = _features(run.model, images, tokens)
    restore(run, state)
    weights = run.method.deployed_weights(state.task - 1, run.model)
    with deployed(run.model, weights):
        after = _features(run.model, images, tokens)
    return before, after, {k: v.detach().clone() for k, v in weights.items()}


# --------------------------------------------------------------------------------------------------- fomo-ray run
@pytest.fixture(scope="module")
def cli_run(bench_root, tmp_path_factory):
    """A finished `fomo-ray run` (finetune): its config and output directory."""
    tmp = tmp_path_factory.mktemp("cli_run")
    cfg = _cfg(bench_root, tmp)
    assert run_cli.main(_overrides(cfg)) == 0
    return cfg, Path(cfg.output_dir) / run_name(cfg)


_OPEN_CLIP_ONLY = r"""
import sys, torch, open_clip
d, images, tokens, out = sys.argv[1:]
assert "fomo_ray" not in sys.modules
torch.set_num_threads(2)
images, tokens = torch.load(images), torch.load(tokens)
open_clip.add_model_config(d)  # the export's <arch>.json makes the tiny architecture known by name
feats = {}
for how in ("name", "local-dir"):
    if how == "name":
        model, _, pre = open_clip.create_model_and_transforms("fomo-tiny-s", pretrained=d + "/open_clip_pytorch_model.bin")
    else:
        model, _, pre = open_clip.create_model_and_transforms("local-dir:" + d)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        feats[how] = torch.cat([model.encode_image(images), model.encode_text(tokens)])
assert "fomo_ray" not in sys.modules
torch.save(feats, out)
"""


def test_run_writes_a_model_open_clip_loads_with_the_loops_deployed_features(cli_run, tmp_path):
    cfg, run_dir = cli_run
    model_dir = run_dir / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [ex.WEIGHTS_FILE, ex.CONFIG_FILE, ex.INFO_FILE, f"{ARCH}.json"])
    info = json.loads((model_dir / ex.INFO_FILE).read_text())
    assert (info["arch"], info["run"], info["config_hash"], info["method"]) == (
        ARCH, run_name(cfg), cfg.config_hash(), "finetune")
    oc_cfg = json.loads((model_dir / ex.CONFIG_FILE).read_text())
    assert oc_cfg["model_cfg"] == json.loads((model_dir / f"{ARCH}.json").read_text())
    assert oc_cfg["preprocess_cfg"]["size"] == 32

    images, tokens = _probe()
    torch.save(images, tmp_path / "images.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    # plain open_clip in a fresh process (fomo_ray never imported): by name after add_model_config, and local-dir:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", _OPEN_CLIP_ONLY, str(model_dir), str(tmp_path / "images.pt"),
                    str(tmp_path / "tokens.pt"), str(tmp_path / "feats.pt")], check=True, env=env, timeout=300)
    plain = torch.load(tmp_path / "feats.pt")

    deployed = ex.load_model(run_dir)  # from the run's state, not its model/ directory
    model, preprocess, tokenizer = deployed.model, deployed.preprocess, deployed.tokenizer
    with pytest.raises(TypeError, match="use its .model, .preprocess and .tokenizer"):
        model, _, preprocess = deployed  # open_clip's order would silently take the tokenizer for the transform
    assert not model.training and torch.equal(tokenizer(["three squares"]), tokens[1:2])
    ours = _features(model, images, tokens)
    _, loop, _ = _loop_features(cfg, load_state(run_dir / "state"), images, tokens)
    assert torch.equal(ours, loop)
    from_dir = ex.load_model(model_dir).model
    assert torch.equal(_features(from_dir, images, tokens), loop)
    # another process (same thread count): the same weights, so equal up to float rounding at most
    torch.testing.assert_close(plain["name"], loop, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain["local-dir"], loop, rtol=0, atol=1e-6)

    # the evaluation transform normalises as the loop's evaluator does (the backbone's mean/std, 32 px)
    from fomo_ray.models.backbones import create_backbone
    from torchvision.transforms import Normalize, Resize

    bb = create_backbone(ARCH, "")
    steps = preprocess.transforms
    norm = next(t for t in steps if isinstance(t, Normalize))
    assert tuple(norm.mean) == bb.mean and tuple(norm.std) == bb.std
    assert next(t for t in steps if isinstance(t, Resize)).size in (32, [32], (32, 32))


# --------------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_exports_strict_open_clip_weights_equal_to_what_it_deploys(name, bench_root, tmp_path):
    import open_clip

    cfg = _cfg(bench_root, tmp_path, **{"method.name": name, **FEW_DOP_STEPS.get(name, {})})
    states = []
    run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append))
    final = states[-1]
    sd = ex.deployed_state(cfg, final)

    fresh = open_clip.create_model(ARCH, pretrained=None)
    assert fresh.load_state_dict(sd, strict=True)  # plain CLIP keys and shapes, no adapter or wrapper left
    images, tokens = _probe()
    theta0, loop, weights = _loop_features(cfg, final, images, tokens)
    exported = _features(fresh, images, tokens)
    if name in PEFT:  # merging W + delta once rounds differently from adding the adapter's output at every call
        torch.testing.assert_close(exported, loop, rtol=0, atol=1e-5)
    else:  # the deployed weights themselves, bit for bit
        assert sd.keys() == weights.keys() and all(torch.equal(sd[k], weights[k]) for k in sd)
        assert torch.equal(exported, loop)
    if name != "zero_shot":  # training reached the export (adapters included)
        assert (exported - theta0).abs().max() > 1e-3
    if name in MERGE_PRESETS:  # the merged model is deployed, not the trained one
        assert any(not torch.equal(sd[k], final.model[k]) for k in sd)


def test_a_mid_task_state_is_refused(bench_root, tmp_path):
    cfg = _cfg(bench_root, tmp_path, **{"ray.checkpoint_every_steps": 1, "stream.num_tasks": 1})
    states = []
    run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append))
    mid = next(s for s in states if s.step > 0)
    with pytest.raises(ex.ExportError, match=rf"mid-task \(task 0, step {mid.step}\)"):
        ex.deployed_state(cfg, mid)


# --------------------------------------------------------------------------------------------------- fomo-ray export
def test_cli_exports_a_run_and_names_bad_input(cli_run, tmp_path, capsys):
    cfg, run_dir = cli_run
    out = tmp_path / "exported"
    assert export_cli.main([str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in printed and "import open_clip" in printed
    assert f'open_clip.create_model_and_transforms("local-dir:{out.resolve()}")' in printed
    assert (out / ex.WEIGHTS_FILE).read_bytes() != b""
    a, b = torch.load(out / ex.WEIGHTS_FILE), torch.load(run_dir / "model" / ex.WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert export_cli.main([str(run_dir), "--out", str(out)]) == 0  # an earlier export is replaced
    capsys.readouterr()

    def error(*argv) -> str:
        assert export_cli.main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fomo-ray export: ") and "\n" not in err and "Traceback" not in err
        return err

    missing = tmp_path / "no_such_run"
    assert str(missing) in error(str(missing), "--out", str(tmp_path / "x"))
    assert "--tracking-uri" in error("0123456789abcdef0123456789abcdef", "--out", str(tmp_path / "x"))
    bare = tmp_path / "bare"  # a loop state without its config
    bare.mkdir()
    shutil.copy(run_dir / "state" / LOOP_STATE_FILE, bare / LOOP_STATE_FILE)
    err = error(str(bare / LOOP_STATE_FILE), "--out", str(tmp_path / "x"))
    assert "no config.json" in err and "--config" in err and str(bare) in err
    assert export_cli.main([str(bare), "--out", str(tmp_path / "y"), "--config", str(run_dir / "config.json")]) == 0
    lora = tmp_path / "lora.yaml"  # a config of another method family than the state's
    lora.write_text(json.dumps({**json.loads((run_dir / "config.json").read_text()), "method": {"name": "lora"}}))
    assert "does not fit the config" in error(str(bare), "--out", str(tmp_path / "w"), "--config", str(lora))
    capsys.readouterr()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "model.safetensors").write_bytes(b"other weights")
    assert "not empty" in error(str(run_dir), "--out", str(occupied))
    assert "holds no export" in error(str(tmp_path), "--out", str(tmp_path / "z"))


def test_a_sweeps_trial_directory_exports_its_newest_checkpoint(cli_run, tmp_path, capsys):
    """``fomo-ray export <sweep>/tune/<trial>``: the newest ``checkpoint_*`` holding a loop state (with the config
    beside it, as a finished trial's final checkpoint has), not "holds no state"."""
    cfg, run_dir = cli_run
    trial = tmp_path / "tune" / "000-seed=0"
    for n in (0, 1):
        shutil.copytree(run_dir / "state", trial / f"checkpoint_{n:06d}")
        shutil.copy(run_dir / "config.json", trial / f"checkpoint_{n:06d}" / "config.json")
    (trial / "checkpoint_000002").mkdir()  # a checkpoint without a loop state (a status only) is passed over
    assert ex.newest_checkpoint(trial) == trial / "checkpoint_000001"
    assert export_cli.main([str(trial), "--out", str(tmp_path / "m")]) == 0
    a, b = torch.load(tmp_path / "m" / ex.WEIGHTS_FILE), torch.load(run_dir / "model" / ex.WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------- MLflow sources
def test_config_from_params_round_trips_a_config(bench_root, tmp_path):
    from fomo_ray.tracking.writer import _param_value

    cfg = _cfg(bench_root, tmp_path, **{"method.name": "ema_merge", "optimizer.lr": 1e-6, "name": "007"})
    params = {k: _param_value(v) for k, v in cfg.flat().items()}
    assert ex.config_from_params(params) == cfg


def test_mlflow_run_sources(cli_run, tmp_path):
    """A run's checkpoints/final (no config.json: the params give the config) and its model/ artifact."""
    from fomo_ray.tracking.writer import Tracker

    cfg, run_dir = cli_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "fomo_ray")
    run_id = tracker.start_child(None, "trial-0", cfg.flat())
    tracker.log_artifacts(run_id, run_dir / "state", artifact_path=ex.STATE_ARTIFACT)
    images, tokens = _probe()
    want = _features(ex.load_model(run_dir).model, images, tokens)
    for source in (run_id, f"runs:/{run_id}", f"runs:/{run_id}/{ex.STATE_ARTIFACT}"):
        got = _features(ex.load_model(source, tracking_uri=uri).model, images, tokens)
        assert torch.equal(got, want), source
    tracker.log_artifacts(run_id, run_dir / "model", artifact_path=ex.MODEL_ARTIFACT)
    out = ex.export(f"runs:/{run_id}", tmp_path / "from_mlflow", tracking_uri=uri)  # the model/ artifact, copied
    assert (out / ex.INFO_FILE).read_bytes() == (run_dir / "model" / ex.INFO_FILE).read_bytes()
    assert (out / ex.WEIGHTS_FILE).read_bytes() == (run_dir / "model" / ex.WEIGHTS_FILE).read_bytes()

    unknown = "f" * 32
    with pytest.raises(ex.ExportError, match=f"{unknown}.*not found"):
        ex.load_model(unknown, tracking_uri=uri)
    empty = tracker.start_child(None, "trial-1", {})
    with pytest.raises(ex.ExportError, match=f"{empty}.*neither"):
        ex.load_model(empty, tracking_uri=uri)
    with pytest.raises(ex.ExportError, match="no database"):
        ex.load_model(run_id, tracking_uri=f"sqlite:///{tmp_path / 'missing.db'}")


# --------------------------------------------------------------------------------------------------- config
def test_keep_checkpoints_is_validated():
    assert load_config().ray.keep_checkpoints == 2
    assert load_config(None, {"ray.keep_checkpoints": 5}).ray.keep_checkpoints == 5
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="ray.keep_checkpoints"):
            load_config(None, {"ray.keep_checkpoints": bad})


# --------------------------------------------------------------------------------------------------- a Ray sweep
@pytest.mark.ray
@pytest.mark.slow
def test_a_finished_trial_logs_its_model_and_points_at_its_checkpoints(ray_local, bench_root, tmp_path, monkeypatch):
    """1 trial x 2 tasks as a Tune function trial with MLflow: ``model/`` is an artifact that load_model reads (equal
    to the export of ``checkpoints/final``), and the fomo_ray.checkpoint_uri tag is the trial's directory in the sweep
    storage, holding the final checkpoint only, trimmed to the deployed model."""
    import fomo_ray.engine.tune_sweep as sweep
    from fomo_ray.engine.ray_train import CHECKPOINT_TAG, EXPORT_ERROR_TAG, FINAL_CHECKPOINT_TAG, UPLOAD_PENDING_TAG
    from fomo_ray.planning.sweep_spec import spec_from_dict
    from fomo_ray.tracking.writer import Tracker

    base = {k: v for k, v in _cfg(bench_root, tmp_path).flat().items() if not isinstance(v, tuple)}
    base.update({"tracking.enabled": True, "ray.keep_checkpoints": 1, "ray.cpus_per_worker": 1.0,
                 "method.name": "ema_merge", "tracking.keep_uploads": True})
    spec = spec_from_dict({"name": "export", "base": base,
                           "space": {"variant": {"points": {"ema": {"method.merge.weight": 0.5}}}}})
    out = sweep.run_sweep(spec)
    assert list(out.trials["status"]) == ["finished"]
    tracker = Tracker(out.tracking_uri, "fomo_ray")
    (child,) = tracker.children(out.parent_run_id)
    run_id = child.info.run_id
    assert EXPORT_ERROR_TAG not in child.data.tags
    arts = {f.path for f in tracker.client.list_artifacts(run_id, ex.MODEL_ARTIFACT)}
    assert f"{ex.MODEL_ARTIFACT}/{ex.WEIGHTS_FILE}" in arts and f"{ex.MODEL_ARTIFACT}/{ex.CONFIG_FILE}" in arts

    images, tokens = _probe()
    logged = _features(ex.load_model(run_id, tracking_uri=out.tracking_uri).model, images, tokens)
    from_state = _features(ex.load_model(f"runs:/{run_id}/{ex.STATE_ARTIFACT}", tracking_uri=out.tracking_uri).model,
                           images, tokens)
    assert torch.equal(logged, from_state)
    # a bare run id finds the store its sweep recorded (no --tracking-uri, MLFLOW_TRACKING_URI unset)
    from fomo_ray.api import recorded_store
    from fomo_ray.cli.export import main as export_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output_dir = Path(out.directory).parents[1]
    assert recorded_store(run_id, output_dir) == out.tracking_uri and recorded_store("runs/x", output_dir) == ""
    assert export_main([run_id, "--out", str(tmp_path / "bare"), "--output-dir", str(output_dir)]) == 0
    assert torch.equal(_features(ex.load_model(tmp_path / "bare").model, images, tokens), logged)

    where = Path(child.data.tags[CHECKPOINT_TAG])
    assert where.is_dir() and where.parent == Path(out.directory) / "tune", where
    final = Path(child.data.tags[FINAL_CHECKPOINT_TAG])  # the pointer to the final checkpoint Ray persisted
    assert UPLOAD_PENDING_TAG not in child.data.tags  # every upload went through
    # the ended trial keeps its final checkpoint only, trimmed to its export (ray.keep_after_run: deployed): the
    # weights the run deployed, the very file MLflow's model/ holds
    kept = sorted(p for p in where.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert kept == [final] and not (final / LOOP_STATE_FILE).exists(), sorted(p.name for p in where.iterdir())
    assert torch.equal(_features(ex.load_model(where).model, images, tokens), logged)
    assert torch.equal(_features(ex.load_model(final).model, images, tokens), logged)


def test_an_ended_trials_checkpoints_are_trimmed_to_its_export(cli_run, tmp_path, capsys):
    """``retention.settle`` (ray.keep_after_run): ``all`` keeps every checkpoint, ``state`` the final loop state,
    ``deployed`` the final checkpoint as its export, whose weights file becomes MLflow's (one inode); the trimmed
    trial still loads and exports to the same weights; settling twice changes nothing."""
    from fomo_ray.results import retention

    cfg, run_dir = cli_run
    trial = tmp_path / "tune" / "000-finetune"
    for n in (0, 1):
        shutil.copytree(run_dir / "state", trial / f"checkpoint_{n:06d}")
        shutil.copy(run_dir / "config.json", trial / f"checkpoint_{n:06d}" / "config.json")
    mlflow_model = shutil.copytree(run_dir / "model", tmp_path / "mlartifacts" / "model")
    names = lambda: sorted(p.name for p in trial.iterdir())  # noqa: E731

    assert retention.settle(str(trial), "all", cfg, "r").freed == 0 and names() == ["checkpoint_000000",
                                                                                     "checkpoint_000001"]
    assert retention.settle(f"s3://bucket/{trial}", "deployed", cfg, "r") == retention.Settled(None, 0)
    kept = retention.settle(str(trial), "state", cfg, "r")
    assert names() == ["checkpoint_000001"] and (kept.final / LOOP_STATE_FILE).is_file() and kept.freed > 0
    done = retention.settle(str(trial), "deployed", cfg, "r", mlflow_model)
    final = trial / "checkpoint_000001"
    assert done.final == final and done.linked and not (final / LOOP_STATE_FILE).exists()
    assert (final / "model" / ex.WEIGHTS_FILE).samefile(mlflow_model / ex.WEIGHTS_FILE)
    assert retention.settle(str(trial), "deployed", cfg, "r", mlflow_model).freed == 0  # idempotent

    images, tokens = _probe()
    want = _features(ex.load_model(run_dir / "model").model, images, tokens)
    assert torch.equal(_features(ex.load_model(trial).model, images, tokens), want)
    assert export_cli.main([str(trial), "--out", str(tmp_path / "m")]) == 0
    a, b = torch.load(tmp_path / "m" / ex.WEIGHTS_FILE), torch.load(run_dir / "model" / ex.WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


def test_keep_after_run_is_validated():
    with pytest.raises(ConfigError, match="ray.keep_after_run"):
        load_config(None, {"ray.keep_after_run": "some"})
