"""A backbone whose input size differs from the stored image size of the benchmark (or of ``data.pool``) is refused
before anything is built -- by a run (``assembly.build_run``), by ``fomo-ray run`` (one line, exit code 2) and by a
sweep's check before launch (``assembly.check_inputs``) -- naming both sizes, the backbone, the directory and the
``fomo-ray prepare`` command that stores the data at the backbone's size; ``data.allow_resize`` accepts it.

ViT-B-32 is only looked up in open_clip's registry here (224 px), never built: the checks run without a model."""
from __future__ import annotations

import shutil

import pytest

from _data_util import SCALE, small_fifmini, toy_images, write_toy
from fomo_ray.core.assembly import ImageSizeMismatch, backbone_input_size, build_run, check_image_size, check_inputs
from fomo_ray.models.backbones import TINY_ARCHS
from fomo_ray.config import load_config
from fomo_ray.data.format import DataError, open_benchmark
from fomo_ray.core.inputs import InputsMissing

BIG = "ViT-B-32"  # 224 px


@pytest.fixture(scope="module")
def fifmini(tmp_path_factory):
    return small_fifmini(tmp_path_factory)  # 32 px


@pytest.fixture(scope="module")
def fifmini_big_tokens(fifmini, tmp_path_factory):
    """A copy of the 32 px FiF-mini with ViT-B-32's token ids too (the shared build must stay as it is)."""
    from fomo_ray.prep.tokenize import upgrade

    root = shutil.copytree(fifmini.root, tmp_path_factory.mktemp("fm_copy") / "fm")
    upgrade(root, [BIG])
    return open_benchmark(root)


def _cfg(root, **over):
    return load_config(None, {"data.root": str(root), "data.scale": SCALE, "data.loader": "memory",
                              "backbone.pretrained": "", "tracking.enabled": False, "stream.num_tasks": 2, **over})


def _pool(root, size: int):
    """A pool-only root (as `fomo-ray prepare pool` writes) at ``size`` px."""
    from fomo_ray.data.format import DatasetInfo
    from fomo_ray.data.writer import BenchmarkWriter

    w = BenchmarkWriter(root, "pool", size)
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval", template="{}"))
    w.write_split("pool", [(img, "POOL", -1, [f"web caption {i}"]) for i, img in enumerate(toy_images(8, size))])
    return w.finish()


def test_backbone_input_size_is_read_without_building_the_model():
    assert backbone_input_size(BIG) == (224, 224)
    assert backbone_input_size("ViT-L-14-336") == (336, 336)
    assert all(backbone_input_size(a) == (32, 32) for a in TINY_ARCHS)  # registered first
    assert backbone_input_size("no-such-arch") is None


def test_tiny_archs_on_fifmini_pass(fifmini):
    for arch in TINY_ARCHS:
        check_image_size(_cfg(fifmini.root, **{"backbone.name": arch}), fifmini)
    check_inputs(_cfg(fifmini.root))  # the default config: fomo-tiny-s on 32 px FiF-mini


def test_a_224px_backbone_on_32px_fifmini_is_refused_naming_sizes_and_command(fifmini):
    cfg = _cfg(fifmini.root, **{"backbone.name": BIG})
    with pytest.raises(ImageSizeMismatch) as err:
        check_inputs(cfg)  # before the token ids (ViT-B-32's are not stored) or anything else
    msg = str(err.value)
    assert isinstance(err.value, InputsMissing) and isinstance(err.value, DataError)  # printed in one line, exit 2
    assert "\n" not in msg
    assert f"backbone '{BIG}' takes 224 px images but the benchmark at {fifmini.root} (config key 'data.root') " \
           f"stores 32 px images" in msg
    new = fifmini.root.with_name(f"{fifmini.root.name}_224px")
    assert f"set data.image_size=224 data.root={new}" in msg  # fomo-ray run and sweeps build it there
    assert f"`fomo-ray prepare fifmini --root {new} --seed 0 --image-size 224 --scale {SCALE}`" in msg
    assert msg.endswith("or set data.allow_resize=true to resize every image from 32 to 224 px on the fly")
    # without automatic preparation the command is the way
    off = _cfg(fifmini.root, **{"backbone.name": BIG, "data.prepare_if_missing": False})
    with pytest.raises(ImageSizeMismatch, match=r"; store FiF-mini at 224 px with `fomo-ray prepare fifmini --root "
                                                r".*_224px --seed 0 --image-size 224 --scale 0.05` and set "
                                                r"data.root=.*_224px, or set data.allow_resize=true"):
        check_image_size(off, fifmini)
    with pytest.raises(ImageSizeMismatch, match="takes 224 px images but the benchmark"):
        build_run(cfg, "cpu")  # a run stops before building anything


def test_allow_resize_accepts_it(fifmini_big_tokens):
    cfg = _cfg(fifmini_big_tokens.root, **{"backbone.name": BIG, "data.allow_resize": True})
    check_image_size(cfg, fifmini_big_tokens)
    check_inputs(cfg)
    with pytest.raises(ImageSizeMismatch):
        check_inputs(cfg.replace({"data.allow_resize": False}))


def test_a_pool_at_another_size_is_refused(fifmini, tmp_path):
    pool = _pool(tmp_path / "pool16", 16)
    cfg = _cfg(fifmini.root, **{"data.pool": str(pool.root)})
    with pytest.raises(ImageSizeMismatch) as err:
        check_inputs(cfg)
    assert str(err.value).startswith(f"backbone 'fomo-tiny-s' takes 32 px images but the pool at {pool.root} "
                                     f"(config key 'data.pool') stores 16 px images; convert the pool at 32 px with "
                                     f"`fomo-ray prepare pool --shards <webdataset shards> --out "
                                     f"{tmp_path / 'pool16_32px'} --image-size 32` and set "
                                     f"data.pool={tmp_path / 'pool16_32px'}, or set data.allow_resize=true")
    check_image_size(cfg.replace({"data.allow_resize": True}), fifmini)
    check_image_size(_cfg(fifmini.root, **{"data.pool": str(_pool(tmp_path / "pool32", 32).root)}), fifmini)


def test_converted_fif_names_the_convert_command(tmp_path):
    bench = write_toy(tmp_path / "fif", toy_images(32, 16))  # adaptation and evaluation sets, 16 px
    cfg = _cfg(bench.root, **{"data.benchmark": "fif"})
    with pytest.raises(ImageSizeMismatch, match=r"takes 32 px images but the benchmark at .*fif \(config key "
                                                r"'data.root'\) stores 16 px images; convert FiF at 32 px with "
                                                r"`fomo-ray prepare fif --root <FiF data root> --out .*fif_32px "
                                                r"--image-size 32` \(with your other options; a --pool converted at "
                                                r"32 px too\) and set data.root=.*fif_32px, or set "
                                                r"data.allow_resize=true"):
        check_image_size(cfg, bench)


def test_fomo_ray_run_prints_one_line_and_exits_2(fifmini_big_tokens, tmp_path, capsys):
    from fomo_ray.cli.run import main

    root = shutil.copytree(fifmini_big_tokens.root, tmp_path / "fm")  # ensure_inputs may write token files
    out = tmp_path / "runs"
    rc = main([f"data.root={root}", f"data.scale={SCALE}", "backbone.name=ViT-B-32", "backbone.pretrained=",
               "tracking.enabled=false", f"output_dir={out}", "data.loader=memory"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"fomo-ray run: ImageSizeMismatch: backbone 'ViT-B-32' takes 224 px images but the "
                          f"benchmark at {root}")
    assert not out.exists() or not any(out.iterdir())  # a refused run leaves no run directory


def test_a_sweep_refuses_the_trial_before_launch(fifmini_big_tokens, tmp_path):
    import ray

    from fomo_ray.planning.sweep_spec import SweepError, parse_space
    from fomo_ray.engine.tune_sweep import ensure_sweep_inputs

    base = _cfg(fifmini_big_tokens.root, **{"budget.mode": "equal_steps", "output_dir": str(tmp_path),
                                             "budget.cache_dir": str(tmp_path / "budget")})
    space = parse_space({"backbone.name": {"grid": ["fomo-tiny-s", BIG]}})
    with pytest.raises(SweepError, match=r"trial .*ViT-B-32.*: ImageSizeMismatch: backbone 'ViT-B-32' takes 224 px "
                                         r"images but the benchmark .* stores 32 px images.*no trial started"):
        ensure_sweep_inputs(base, space)
    assert not ray.is_initialized()
    ensure_sweep_inputs(base.replace({"data.allow_resize": True}), space)

