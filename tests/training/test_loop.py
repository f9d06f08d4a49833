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


def test_the_training_loss_builds_no_kv_cache(llama_dir):
    """A transformers model left at ``use_cache=True`` fills a KV cache in every training forward
    (memory held to the end of the step; under CUDA graphs, earlier layers' graph outputs that
    Dynamo reads): the fit loop's loss asks for none, and is the same loss."""
    from transformers import AutoModelForCausalLM

    from lorasoup.training.loop import language_model_loss

    model = AutoModelForCausalLM.from_pretrained(llama_dir).train()
    assert model.config.use_cache
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    caches = []
    model.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    loss = language_model_loss(model, batch)
    plain = model(**batch).loss
    assert caches[0] is None and caches[1] is not None  # what the plain call does, and the loss avoids
    torch.testing.assert_close(loss, plain)
