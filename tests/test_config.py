"""Config tree: load, override, flat view, unknown keys, wrong types, range checks."""
import dataclasses

import pytest

from fomo_ray.config import (
    ConfigError,
    ExperimentConfig,
    field_docs,
    from_dict,
    load_config,
    parse_override,
)


def test_defaults_are_frozen_and_documented():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    docs = field_docs()
    assert len(docs) > 50
    missing = [k for k, (_, doc) in docs.items() if len(doc) < 10]
    assert not missing, f"fields without a one-line reason: {missing}"


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\nmethod:\n  name: ema_merge\n  merge:\n    weight: 0.3\noptimizer:\n  lr: 1e-5\n")
    cfg = load_config(p, ["method.merge.weight=0.7", "optimizer.betas=[0.9, 0.95]", "data.loader=memory"])
    assert cfg.seed == 3 and cfg.method.name == "ema_merge"
    assert cfg.method.merge.weight == 0.7
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.data.loader == "memory"


def test_flat_view_roundtrips():
    cfg = load_config(overrides={"method.merge.weight": 0.2, "stream.num_tasks": 7})
    flat = cfg.flat()
    assert flat["method.merge.weight"] == 0.2 and flat["stream.num_tasks"] == 7
    assert set(flat) == set(field_docs())
    assert ExperimentConfig().replace(flat) == cfg
    assert cfg.config_hash() != ExperimentConfig().config_hash()
    assert cfg.config_hash() == load_config(overrides=flat).config_hash()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("method.merge.wieght=0.5", "did you mean 'method.merge.weight'"),
        ("optimiser.lr=0.1", "did you mean 'optimizer.lr'"),
        ("seeed=1", "did you mean 'seed'"),
    ],
)
def test_unknown_keys_name_the_key_and_suggest(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert override.split("=")[0] in str(e.value) and needle in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mixture:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"mixture\.batch_sise.*did you mean 'mixture\.batch_size'"):
        load_config(p)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stream.num_tasks=four", "stream.num_tasks': expected an integer"),
        ("stream.num_tasks=2.5", "stream.num_tasks': expected an integer"),
        ("optimizer.lr=fast", "optimizer.lr': expected a number"),
        ("data.loader=dali", "data.loader'"),
        ("evaluation.full_at_ends=1", "evaluation.full_at_ends': expected true/false"),
        ("optimizer.betas=[0.9]", "optimizer.betas': expected 2 values"),
    ],
)
def test_wrong_types_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"mixture.pool": 0.5}, "must sum to 1"),
        ({"method.merge.weight": 1.5}, "method.merge.weight"),
        ({"method.peft.rank": 0}, "method.peft.rank"),
        ({"stream.num_tasks": 0}, "stream.num_tasks"),
    ],
)
def test_range_checks(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("seed")
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict({"data": 3})


def test_resolved_makes_paths_absolute(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    cfg = load_config(overrides={"data.root": "d/fif", "backbone.pretrained": "ckpt.pt"}).resolved(tmp_path)
    assert cfg.data.root == str(tmp_path / "d" / "fif")
    assert cfg.output_dir == str(tmp_path / "runs")
    assert cfg.backbone.pretrained == str(tmp_path / "ckpt.pt")
    tag = load_config(overrides={"backbone.pretrained": "laion2b_s34b_b88k"}).resolved(tmp_path)
    assert tag.backbone.pretrained == "laion2b_s34b_b88k"  # a tag, not a file: untouched
    assert cfg.resolved(tmp_path) == cfg  # idempotent
