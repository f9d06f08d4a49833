"""The shared fit loop's pieces; tests/cat/test_fit.py and tests/moe/test_train.py run the whole loop."""

import pytest
import torch

from lorasoup.errors import LorasoupError
from lorasoup.training.loop import (
    EpochShuffle,
    linear_warmup_decay,
    load_checkpoint,
    save_checkpoint,
    warmup_steps,
)


def test_warmup_is_steps_or_a_fraction():
    assert warmup_steps(0.05, 100) == 5 and warmup_steps(7, 100) == 7 and warmup_steps(0, 100) == 0


def test_schedule_warms_up_then_decays_to_zero():
    factor = linear_warmup_decay(10, 2)
    assert [factor(s) for s in range(4)] == [0.5, 1.0, 1.0, 7 / 8]
    assert factor(10) == 0.0


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffle(20, seed=3), EpochShuffle(20, seed=3)
    b.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(20))
    a.set_epoch(1)
    assert list(a) == list(b)


def test_checkpoint_round_trip_and_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "step-2", {"step": 2, "theta": torch.ones(2)}, file="x_state.pt")
    state = load_checkpoint(tmp_path / "step-2", file="x_state.pt", kind="CAT")
    assert state["step"] == 2 and torch.equal(state["theta"], torch.ones(2))
    assert [p.name for p in (tmp_path / "step-2").iterdir()] == ["x_state.pt"]  # no temporary left
    with pytest.raises(LorasoupError, match="no MoE checkpoint"):
        load_checkpoint(tmp_path / "missing", file="x_state.pt", kind="MoE")
