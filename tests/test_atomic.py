"""Atomic writes (issue 29): the final file has the mode a plain ``open(path, "w")`` gives it under the process's
umask (not mkstemp's 0600), a failed write leaves nothing, and ``torch_save`` is byte-identical for identical
tensors wherever it writes."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from fomo_ray.atomic import atomic_path, torch_save, umask, write_json, write_text


@pytest.fixture
def mask():
    """Run under a chosen umask, restored afterwards."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("m", [0o022, 0o002, 0o077])
def test_final_files_get_the_mode_open_would_give(tmp_path, mask, m):
    mask(m)
    assert umask() == m
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path in (write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {"a": 1}),
                 torch_save({"w": torch.ones(2)}, tmp_path / "c.pt")):
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~m, path


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_torch_save_is_byte_identical_for_identical_tensors(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4, dtype=torch.int64)}
    a = torch_save(state, tmp_path / "one" / "model.pt").read_bytes()
    b = torch_save({k: v.clone() for k, v in state.items()}, tmp_path / "two" / "other_name.pt").read_bytes()
    assert a == b
    back = torch.load(tmp_path / "two" / "other_name.pt", weights_only=True)
    assert all(torch.equal(back[k], state[k]) for k in state)
