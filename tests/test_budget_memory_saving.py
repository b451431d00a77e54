"""The budget charges what gradient accumulation and checkpointing change (issue 27): one more forward per step for
each, and with accumulation the activations of one micro-batch; a setting at its default leaves records alone."""
import pytest

from fomo_ray.budgets import budget as B
from fomo_ray.config import load_config


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """finetune and lora records of fomo-tiny-s at b = 16, plain / accumulating (k = 4) / checkpointing."""
    cache = tmp_path_factory.mktemp("budget")
    out = {}
    for label, keys in (("plain", {}), ("accum", {"optimizer.accum_steps": 4}),
                        ("ckpt", {"backbone.grad_checkpointing": True})):
        cfg = load_config(None, {"budget.cache_dir": str(cache), "mixture.batch_size": 16, **keys})
        out[label] = {m: B.method_record(cfg, m) for m in ("finetune", "lora")}
    return out


def test_accumulation_adds_a_forward_and_keeps_one_micro_batch_of_activations(records):
    plain, accum = records["plain"]["finetune"], records["accum"]["finetune"]
    assert accum.counted_gflops == pytest.approx(plain.counted_gflops * 4 / 3)
    state = plain.peak_bytes - plain.batch_bytes
    assert plain.batch_bytes > 0 and accum.peak_bytes == pytest.approx(state + plain.batch_bytes / 4, abs=1)
    assert "4 micro-batches" in accum.measured and accum.settings_hash != plain.settings_hash


def test_checkpointing_adds_a_forward_and_keeps_the_ledgers_activations(records):
    """Checkpointing's memory is what block_ledger counted beside the plain step: outside the blocks, every block's
    input and one block's saved tensors (tests/test_accumulation.py checks the ledger against a checkpointed run)."""
    for m in ("finetune", "lora"):
        plain, ckpt = records["plain"][m], records["ckpt"][m]
        assert ckpt.counted_gflops == pytest.approx(plain.counted_gflops * 4 / 3)
        assert 0 < plain.checkpointed_batch_bytes < plain.batch_bytes
        state = plain.peak_bytes - plain.batch_bytes
        assert ckpt.peak_bytes == state + plain.checkpointed_batch_bytes and "grad checkpointing" in ckpt.measured


def test_a_record_without_a_checkpointed_count_keeps_the_plain_memory(records):
    """A CUDA allocator peak has no per-block count: the plain step's memory stays (an upper bound)."""
    import dataclasses

    plain = dataclasses.replace(records["plain"]["lora"], checkpointed_batch_bytes=0)
    assert B.charge_memory_saving(plain, grad_checkpointing=True).peak_bytes == plain.peak_bytes


def test_defaults_leave_the_record_and_its_cache_key_alone(records):
    r = records["plain"]["finetune"]
    assert B.charge_memory_saving(r) is r and "charged" not in r.measured
