"""Training the routers: the loss falls, only routers move, the balance term is the formula's, resume."""

import pytest
import torch

from lorasoup.moe.config import MoeTrainOptions
from lorasoup.moe.layer import load_balancing_loss
from lorasoup.moe.train import train_routers
from lorasoup.training.data import build_dataset


def lm_loss(composition, dataset, collate_fn):
    with torch.no_grad():
        return float(composition.model(**collate_fn(list(dataset))).loss)


@pytest.mark.parametrize(("granularity", "top_k"), [("module", None), ("layer", 1)])
def test_training_lowers_the_loss_and_moves_only_the_routers(compose, data, granularity, top_k):
    dataset, collate_fn = data
    composition = compose(granularity=granularity, top_k=top_k)
    frozen = {n: p.detach().clone() for n, p in composition.model.named_parameters() if not p.requires_grad}
    routers = [p.detach().clone() for p in composition.routers.parameters()]
    before = lm_loss(composition, dataset, collate_fn)
    options = MoeTrainOptions(learning_rate=0.1, epochs=4, batch_size=8, warmup=0.0)
    result = train_routers(composition, dataset, collate_fn, options, balance_coef=0.01)
    after = lm_loss(composition, dataset, collate_fn)
    assert result.steps == 4 * 3 and len(result.balance_losses) == 12
    assert after < before - 0.01, (before, after)
    for name, p in composition.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(routers, composition.routers.parameters(), strict=True))
    for lm, balance, total in zip(result.lm_losses, result.balance_losses, result.losses, strict=True):
        assert total == pytest.approx(lm + 0.01 * balance, rel=1e-5)


def test_balance_term_is_the_formula_over_real_tokens(compose, data, tokenizer):
    dataset, collate_fn = data
    composition = compose(top_k=1)
    short = build_dataset([{"text": "the cat"}], tokenizer, template="plain", cutoff_len=64)
    batch = collate_fn([dataset[0], short[0], dataset[23]])  # different lengths: padding
    with torch.no_grad(), composition.recording() as records:
        composition.model(**batch)
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    expected = []
    for record in records:
        real = mask.reshape(-1).bool()
        logits = record.logits.reshape(-1, 2)[real]
        expected.append(load_balancing_loss(logits, record.chosen.reshape(-1, 1)[real]))
    assert len(records) == len(composition.sites)
    torch.testing.assert_close(composition.balance_loss(records, mask), torch.stack(expected).mean())


def test_a_strong_balance_term_evens_out_the_routing(compose, data):
    dataset, collate_fn = data

    def routed_share(composition):
        with torch.no_grad(), composition.recording() as records:
            composition.model(**collate_fn(list(dataset)))
        chosen = torch.cat([r.chosen.reshape(-1) for r in records])
        return float((chosen == 0).float().mean())

    composition = compose(top_k=1, init_std=0.0)
    with torch.no_grad():
        for router in composition.routers:
            router.bias.copy_(torch.tensor([3.0, 0.0]))  # everything goes to adapter 0
    assert routed_share(composition) == 1.0
    options = MoeTrainOptions(learning_rate=0.05, epochs=6, batch_size=8, warmup=0.0)
    result = train_routers(composition, dataset, collate_fn, options, balance_coef=10.0)
    assert result.balance_losses[-1] < result.balance_losses[0]
    assert 0.2 < routed_share(composition) < 0.8


def test_resume_matches_uninterrupted(compose, data, tmp_path):
    dataset, collate_fn = data
    options = MoeTrainOptions(learning_rate=0.05, epochs=2, batch_size=5, grad_accum=2, save_steps=2, seed=3)
    full = compose(top_k=1, seed=4)
    train_routers(full, dataset, collate_fn, options, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "step-2" / "moe_state.pt").is_file()
    resumed = compose(top_k=1, seed=4)
    result = train_routers(resumed, dataset, collate_fn, options, resume_from=tmp_path / "ckpt" / "step-4")
    assert result.resumed_from_step == 4 and result.steps == 6
    for a, b in zip(full.routers.parameters(), resumed.routers.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_train_moe_in_memory_then_batched_generation(llama_dir, adapter_dirs):
    """The library entry point: records in memory, a model that generates; padding never leaks into a
    prompt's gates, so a batch of prompts generates what each prompt alone does."""
    from lorasoup.evaluation.generate import GenerationSettings, generate
    from lorasoup.moe.config import RouterOptions
    from lorasoup.moe.run import train_moe
    from tests.moe.conftest import RECORDS

    result = train_moe(
        llama_dir,
        adapter_dirs,
        RECORDS,
        router=RouterOptions(top_k=1),
        train=MoeTrainOptions(learning_rate=0.05, max_steps=3, batch_size=8),
        template="plain",
        cutoff_len=64,
    )
    assert result.fit.steps == 3 and result.examples == len(RECORDS)
    assert not result.model.training
    prompts = ["what is 1 plus 2 ?", "the cat sat on the mat and wrote"]
    result.tokenizer.padding_side = "left"
    batched = generate(
        result.model, result.tokenizer, prompts, GenerationSettings(max_new_tokens=5, batch_size=2)
    )
    alone = generate(
        result.model, result.tokenizer, prompts, GenerationSettings(max_new_tokens=5, batch_size=1)
    )
    assert [g.text for g in batched] == [g.text for g in alone]
