"""TiC-CLIP's bounded cumulative buffers (fomo_ray/data/buffer.py): shares per past task, determinism, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fomo_ray.data.buffer import BUFFERS, cumulative_shares, make_buffer
from fomo_ray.data.format import DataError

SIZE = 256


def _task(t: int) -> np.ndarray:
    return np.arange(1000 * t, 1000 * t + 600)  # more rows than any share


@pytest.mark.parametrize("policy", ["cumulative_exp", "cumulative_equal"])
def test_shares_per_past_task_follow_the_rule_for_1_to_8_tasks(policy):
    buf = make_buffer(policy, SIZE, seed=3)
    for T in range(1, 9):
        buf.add(_task(T - 1))
        counts = [len(r) for r in buf.task_rows()]
        if policy == "cumulative_exp":  # newest past task 1/2, then 1/4, ..., the oldest the same as the next
            fractions = [2.0 ** -(T - i) for i in range(T)]
            fractions[0] = 1.0 if T == 1 else fractions[1]
        else:
            fractions = [1.0 / T] * T
        assert sum(fractions) == pytest.approx(1.0)
        assert sum(counts) == len(buf) == SIZE
        assert all(abs(c - SIZE * f) < 1 for c, f in zip(counts, fractions)), (T, counts)
        assert counts == cumulative_shares(SIZE, T, policy.split("_")[1])
        for t, rows in enumerate(buf.task_rows()):  # each task keeps its own rows only, without repeats
            assert set(rows) <= set(_task(t)) and len(set(rows)) == len(rows)
        assert np.array_equal(buf.rows(), np.sort(np.concatenate(buf.task_rows())))


def test_exp_shares_are_exact_powers_of_two():
    assert cumulative_shares(256, 8, "exp") == [2, 2, 4, 8, 16, 32, 64, 128]
    assert cumulative_shares(256, 1, "exp") == [256]
    assert cumulative_shares(10, 3, "equal") == [3, 3, 4]  # the row left over goes to the newest
    with pytest.raises(DataError, match="valid: exp, equal"):
        cumulative_shares(10, 3, "linear")


@pytest.mark.parametrize("policy", ["cumulative_exp", "cumulative_equal"])
def test_kept_rows_only_shrink_and_a_resumed_buffer_is_bitwise_the_same(policy):
    full = make_buffer(policy, 40, seed=7)
    history = []
    for t in range(5):
        full.add(_task(t)[: 30 + 7 * t])
        history.append(full.task_rows())
        if t == 2:  # checkpoint mid-stream (through JSON, as plain Python data) and resume in a fresh buffer
            saved = json.loads(json.dumps(full.state_dict()))
    for before, after in zip(history, history[1:]):  # a row once dropped never comes back: prefixes of each other
        for old, new in zip(before, after):
            assert np.array_equal(old[: len(new)], new)
    resumed = make_buffer(policy, 40, seed=7)
    resumed.load_state_dict(saved)
    for t in range(3, 5):
        resumed.add(_task(t)[: 30 + 7 * t])
    assert resumed.state_dict() == full.state_dict()
    assert np.array_equal(resumed.rows(), full.rows())
    other_seed = make_buffer(policy, 40, seed=8)
    for t in range(5):
        other_seed.add(_task(t)[: 30 + 7 * t])
    assert not np.array_equal(other_seed.rows(), full.rows())
    with pytest.raises(DataError, match="not 'reservoir'"):
        make_buffer("reservoir", 40, 7).load_state_dict(saved)


def test_registry_lists_every_policy_the_config_accepts():
    import typing

    from fomo_ray.config import MixtureConfig

    hints = typing.get_type_hints(MixtureConfig)
    assert set(typing.get_args(hints["buffer_policy"])) == set(BUFFERS)
