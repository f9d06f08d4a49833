"""Batched population scoring against one candidate per forward, transformers' own loss, and the layer."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat
from lorasoup.search.scoring import l1_penalty, score_one_at_a_time, score_population, target_batches
from tests.conftest import make_peft_lora


def examples(count, seed=0):
    """Token examples of different lengths (so padding is exercised), prompt tokens masked."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(4, 90, (6 + 2 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 3 + ids[3:]})
    return rows


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, llama_dir):
    """K = 3, mixed ranks, rsLoRA, and modules only some adapters target."""
    root = tmp_path_factory.mktemp("scoring-adapters")
    return [
        make_peft_lora(llama_dir, root / "a", r=4, alpha=32, seed=1),
        make_peft_lora(llama_dir, root / "b", r=2, alpha=16, seed=2, targets=["q_proj", "v_proj"]),
        make_peft_lora(
            llama_dir, root / "c", r=3, alpha=24, seed=3, targets=["up_proj", "v_proj"], use_rslora=True
        ),
    ]


@pytest.fixture
def composition(adapter_dirs, llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    adapters = [load_adapter(path) for path in adapter_dirs]
    return compose_cat(model, adapters, granularity="module", parameterisation="free")


def population(composition, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(size, *composition.weights.theta.shape).uniform_(-1.5, 1.5, generator=g)


@pytest.mark.parametrize(("examples_per_batch", "candidates_per_forward"), [(None, None), (2, 2), (5, 3)])
def test_batched_scores_equal_one_at_a_time(composition, examples_per_batch, candidates_per_forward):
    batches = target_batches(examples(5), pad_token_id=0, device="cpu", examples_per_batch=examples_per_batch)
    weights = population(composition, 6)
    theta = composition.weights.theta.detach().clone()
    batched = score_population(composition, batches, weights, candidates_per_forward=candidates_per_forward)
    reference = score_one_at_a_time(composition, batches, weights)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    assert reference.max() - reference.min() > 1e-3  # the candidates really differ
    assert torch.equal(composition.weights.theta, theta)  # both scorers leave θ as it was
    assert composition.weights.population is None


def test_one_at_a_time_equals_the_models_own_loss(composition):
    rows = examples(4)
    (batch,) = target_batches(rows, pad_token_id=0, device="cpu")
    w = population(composition, 1, seed=3)
    composition.set_effective_weights(w[0])
    with torch.no_grad():
        expected = composition.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    torch.testing.assert_close(score_one_at_a_time(composition, [batch], w)[0], expected, atol=1e-6, rtol=0)


def test_population_rows_are_candidate_major(composition):
    """Row block j of the batch gets exactly the logits the normal path gives with θ = candidate j."""
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    weights = population(composition, 3, seed=5)
    with torch.no_grad(), composition.population(weights):
        batched = composition.model(input_ids=ids.repeat(3, 1)).logits.view(3, 2, 7, -1)
    for j in range(3):
        composition.set_effective_weights(weights[j])
        with torch.no_grad():
            torch.testing.assert_close(batched[j], composition.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_normal_path_is_unchanged_and_population_always_cleared(composition):
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = composition.model(input_ids=ids).logits
        with (
            pytest.raises(ValueError, match="cannot be split evenly"),
            composition.population(population(composition, 3)),
        ):
            composition.model(input_ids=ids)  # 2 rows for 3 candidates
        assert composition.weights.population is None
        after = composition.model(input_ids=ids).logits
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="must have shape"):
        composition.weights.set_population(torch.zeros(2, 1, 3))


def test_l1_penalty_is_lorahub_mean_absolute_weight():
    weights = torch.tensor([[[1.0, -2.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, -4.0]]])  # (P=2, G=2, K=2)
    torch.testing.assert_close(l1_penalty(weights, 0.1), torch.tensor([0.1 * 4.0 / 4, 0.1 * 4.0 / 4]))
