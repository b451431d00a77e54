"""Transient vs deterministic errors (issue 28): a download that hits network trouble is retried with back-off and
succeeds, or ends as a TransientError (not a ValueError: the sweep's trial is retried by Tune, not recorded as a
deterministic failure); a bad tag or a missing file is raised at once, never retried."""
from __future__ import annotations

import pytest
import torch

from fomo_ray import retry
from fomo_ray.models.backbones import BackboneError, create_backbone
from fomo_ray.retry import TransientError, is_transient, with_backoff


class _HTTPError(OSError):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.response = type("R", (), {"status_code": status})()


@pytest.mark.parametrize("exc,transient", [
    (ConnectionError("reset"), True), (TimeoutError("read timed out"), True), (_HTTPError(503), True),
    (_HTTPError(429), True), (_HTTPError(404), False), (_HTTPError(401), False),
    (FileNotFoundError("x"), False), (PermissionError("x"), False), (ValueError("bad config"), False),
    (RuntimeError("diverged"), False)])
def test_errors_are_classified(exc, transient):
    assert is_transient(exc) is transient


def test_a_transient_failure_is_retried_with_back_off_then_succeeds():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "weights"

    assert with_backoff(flaky, "weights", sleep=waits.append) == "weights"
    assert len(calls) == 3 and waits == [2.0, 4.0]  # doubling from BASE_S


def test_a_failure_that_persists_becomes_a_transient_error_naming_what():
    waits = []
    with pytest.raises(TransientError, match=r"open_clip weights 'X/y': still failing after 4 attempts"):
        with_backoff(lambda: (_ for _ in ()).throw(_HTTPError(503)), "open_clip weights 'X/y'", sleep=waits.append)
    assert waits == retry.delays() == [2.0, 4.0, 8.0]
    assert not isinstance(TransientError("x"), ValueError)  # tune_sweep.DETERMINISTIC does not catch it


def test_a_deterministic_error_is_raised_at_once():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such checkpoint")

    with pytest.raises(FileNotFoundError):
        with_backoff(missing, "x", sleep=lambda s: pytest.fail("slept"))
    assert calls == [1]


def test_a_tag_download_retries_through_open_clip(monkeypatch, tmp_path):
    """create_backbone's real tag path with open_clip's download stood in (it fails twice, then serves a file) and
    its weight loading skipped on the meta device, as tests/test_activation.py does."""
    import open_clip
    import open_clip.factory as factory

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **kw: None)
    monkeypatch.setattr(factory, "_set_model_device_and_precision", lambda *a, **kw: None)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *a, **kw: None)
    stand_in = tmp_path / "weights.bin"
    stand_in.write_bytes(b"")
    calls = []

    def download(cfg, **kw):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("hf.co: connection reset")
        return str(stand_in)

    monkeypatch.setattr(factory, "download_pretrained", download)
    with torch.device("meta"):
        bb = create_backbone("ViT-B-32", "openai", device="meta")
        assert len(calls) == 3 and bb.quick_gelu  # OpenAI weights: built with QuickGELU
        monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: (_ for _ in ()).throw(
            ConnectionError("hf.co: connection reset")))
        with pytest.raises(TransientError, match="open_clip weights 'ViT-B-32/openai': still failing"):
            create_backbone("ViT-B-32", "openai", device="meta")
        with pytest.raises(BackboneError, match="neither a checkpoint file nor an open_clip pretrained tag"):
            create_backbone("ViT-B-32", "no-such-tag", device="meta")  # deterministic: refused, no fetch
