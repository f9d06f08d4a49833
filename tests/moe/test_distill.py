"""Distillation: the CAT weights are the routers' mean gates over real tokens; the export is exact."""

import pytest
import torch

from lorasoup.cat.fold import fold_composition
from lorasoup.moe.distill import distill_to_cat, mean_gates
from tests.moe.test_inject import perturb_routers


def reference_mean_gates(composition, dataset):
    """One example at a time (no padding), each module's gates recomputed from its captured router input."""
    model, sums, counts = composition.model, {}, {}
    inputs = {}

    def capture(group):
        def hook(module, args, kwargs):
            inputs.setdefault(group, args[0] if args else kwargs["hidden_states"])

        return hook

    hooks = []
    for site in composition.sites:
        target = site.path if composition.granularity == "module" else composition.group_names[site.group]
        hooks.append(
            model.get_submodule(target).register_forward_pre_hook(capture(site.group), with_kwargs=True)
        )
    with torch.no_grad():
        for example in dataset:
            inputs.clear()
            model(torch.tensor([example["input_ids"]]))
            for g, h in inputs.items():
                router = composition.routers[g]
                probs = torch.softmax(h[0] @ router.weight.T + router.bias, -1)  # (seq, K)
                gates = (
                    probs if router.top_k is None else probs * (probs == probs.max(-1, keepdim=True).values)
                )
                sums[g] = sums.get(g, 0) + gates.sum(0)
                counts[g] = counts.get(g, 0) + gates.shape[0]
    for handle in hooks:
        handle.remove()
    return torch.stack([sums[g] / counts[g] for g in range(len(composition.routers))])


@pytest.mark.parametrize(("granularity", "top_k"), [("module", None), ("layer", 1)])
def test_distilled_cat_weights_equal_the_mean_gates(compose, data, granularity, top_k):
    dataset, collate_fn = data
    composition = compose(granularity=granularity, top_k=top_k)
    perturb_routers(composition, seed=2)
    expected = reference_mean_gates(composition, dataset)
    gates, tokens = mean_gates(composition, dataset, collate_fn, batch_size=5)  # padded batches
    assert tokens == sum(len(e["input_ids"]) for e in dataset)
    torch.testing.assert_close(gates, expected, atol=1e-5, rtol=1e-5)

    group_of = {site.path: site.group for site in composition.sites}
    cat = distill_to_cat(composition, gates)
    w = cat.effective_weights()
    for g, path in enumerate(cat.group_names):
        torch.testing.assert_close(w[g], gates[group_of[path]])


def test_the_distilled_adapter_reproduces_the_cat_model_in_stock_peft(compose, data, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorasoup.export.peft import save_peft_adapter

    dataset, collate_fn = data
    composition = compose()
    perturb_routers(composition, seed=7)
    gates, _ = mean_gates(composition, dataset, collate_fn)
    cat = distill_to_cat(composition, gates)
    save_peft_adapter(fold_composition(cat), tmp_path / "peft", base_model=str(llama_dir), model=cat.model)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "peft"
    ).eval()
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, cat.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
