"""Training the CAT weights: the loss falls, only θ moves, resuming ends where the full run does."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.fit import fit_cat_weights
from lorasoup.cat.inject import compose_cat
from lorasoup.options import FitOptions
from lorasoup.training.data import build_dataset, collate

RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "output": f"the answer is {a + b}"}
    for a in range(6)
    for b in range(4)
]


@pytest.fixture
def setup(make_lora, llama_dir, tokenizer):
    adapters = [
        load_adapter(make_lora("a", seed=1), name="a"),
        load_adapter(make_lora("b", seed=2), name="b"),
    ]
    dataset = build_dataset(RECORDS, tokenizer, template="plain", cutoff_len=96)
    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)

    def fresh(parameterisation="softmax", dropout=0.0):
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        return compose_cat(model, adapters, parameterisation=parameterisation, seed=7, dropout=dropout)

    return fresh, dataset, collate_fn


def full_loss(composition, dataset, collate_fn):
    with torch.no_grad():
        return float(composition.model(**collate_fn(list(dataset))).loss)


@pytest.mark.parametrize("parameterisation", ["softmax", "free"])
def test_training_lowers_the_loss_and_moves_only_theta(setup, parameterisation):
    fresh, dataset, collate_fn = setup
    composition = fresh(parameterisation)
    frozen = {n: p.detach().clone() for n, p in composition.model.named_parameters() if "lorasoup" not in n}
    layer = next(iter(composition.layers().values()))
    A_before = layer.A.clone()
    before = full_loss(composition, dataset, collate_fn)
    options = FitOptions(learning_rate=0.1, epochs=6, batch_size=8, warmup=0.0)
    result = fit_cat_weights(composition, dataset, collate_fn, options)
    after = full_loss(composition, dataset, collate_fn)
    assert result.steps == 6 * 3
    assert after < before - 0.01, (before, after)
    assert not torch.equal(composition.weights.theta.detach(), composition.theta_init)
    for name, p in composition.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert torch.equal(layer.A, A_before)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_matches_uninterrupted(setup, tmp_path, dropout):
    fresh, dataset, collate_fn = setup
    options = FitOptions(learning_rate=0.05, epochs=2, batch_size=5, grad_accum=2, save_steps=2, seed=3)
    torch.manual_seed(0)
    full = fresh(dropout=dropout)
    fit_cat_weights(full, dataset, collate_fn, options, checkpoint_dir=tmp_path / "ckpt")
    # 24 examples / 5 per batch = 5 batches, 3 optimizer steps per epoch: step-2 is mid-epoch
    assert (tmp_path / "ckpt" / "step-2" / "cat_state.pt").is_file()
    assert (tmp_path / "ckpt" / "step-4" / "cat_state.pt").stat().st_size < 20_000

    resumed = fresh(dropout=dropout)
    result = fit_cat_weights(resumed, dataset, collate_fn, options, resume_from=tmp_path / "ckpt" / "step-4")
    assert result.resumed_from_step == 4 and result.steps == 6
    torch.testing.assert_close(resumed.weights.theta, full.weights.theta, atol=0, rtol=0)


def test_same_seed_same_weights(setup):
    fresh, dataset, collate_fn = setup
    options = FitOptions(learning_rate=0.05, max_steps=4, batch_size=6)
    first, second = fresh(), fresh()
    fit_cat_weights(first, dataset, collate_fn, options)
    fit_cat_weights(second, dataset, collate_fn, options)
    assert torch.equal(first.weights.theta, second.weights.theta)


def test_compiled_training_learns_the_eager_weights(setup, tokenizer):
    """train.compile compiles each decoder layer (regionally); padded to fixed widths, the θ it learns
    equals eager training's, and padding itself changes nothing (it is masked out of the loss)."""
    fresh, dataset, collate_fn = setup
    options = FitOptions(learning_rate=0.1, max_steps=4, batch_size=8, warmup=0.0)
    eager = fresh()
    fit_cat_weights(eager, dataset, collate_fn, options)
    padded = functools.partial(collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=32)
    assert padded(list(dataset)[:3])["input_ids"].shape[1] % 32 == 0
    compiled = fresh()
    torch._dynamo.reset()
    fit_cat_weights(compiled, dataset, padded, FitOptions(**{**vars(options), "compile": "default"}))
    torch.testing.assert_close(compiled.weights.theta, eager.weights.theta, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager.weights.theta, eager.theta_init)
    # The composition's own model stays plain (the compiled view is only used for training).
    assert not any("_orig_mod" in name for name, _ in compiled.model.named_modules())
