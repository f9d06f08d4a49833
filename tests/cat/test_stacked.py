"""``lorasoup.cat.stacked``: CAT with each module's ``[W0; A]`` stacked computes what the plain layer
computes, costs no second copy of ``W0`` nor more saved activations, and gives the model back intact;
``fit_cat_weights`` stacks under CUDA graphs on one GPU and trains the same θ."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat import stacked as cat_stacked
from lorasoup.cat.inject import compose_cat, remove_cat


def loss_and_grad(model, composition, ids):
    composition.weights.theta.grad = None
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return loss.detach(), composition.weights.theta.grad.clone(), embeds.grad


def test_stacked_layer_equals_cat_and_unstacks_bit_for_bit(make_lora, llama_dir) -> None:
    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    composition = compose_cat(model, adapters, parameterisation="softmax", seed=3)
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = loss_and_grad(model, composition, ids)

    stacked = cat_stacked.stack(model)
    assert stacked == len(composition.sites)
    module = next(m for m in model.modules() if isinstance(m, cat_stacked.StackedCatLinear))
    weight = module.layer.base.weight
    assert weight.data_ptr() == module.stacked.data_ptr()  # W0 is a view: no second copy
    assert module.layer.A.data_ptr() == module.stacked[module.out :].data_ptr()
    for got, want in zip(loss_and_grad(model, composition, ids), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    cat_stacked.unstack(model)
    assert not any(isinstance(m, cat_stacked.StackedCatLinear) for m in model.modules())
    for got, want in zip(loss_and_grad(model, composition, ids), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    remove_cat(composition)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].untyped_storage().nbytes() == value.numel() * value.element_size()  # own storage


def activation_bytes_saved(model, ids) -> int:
    """Bytes of the storages autograd saves for the backward of one step, weights and buffers aside."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return sum(saved.values())


def test_stacked_layer_saves_no_more_for_the_backward_than_cat(make_lora, llama_dir) -> None:
    """The product ``z ⊙ c`` saves ``z`` for its backward; were ``z`` a view of the stacked GEMM's
    ``(..., out + R)`` output, the whole output would stay alive until the backward (the H100 run of
    session 12: +1.7 GiB a 7B step)."""
    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    compose_cat(model, adapters, parameterisation="softmax", seed=3)
    ids = torch.randint(4, 90, (4, 32), generator=torch.Generator().manual_seed(1))
    plain = activation_bytes_saved(model, ids)
    cat_stacked.stack(model)
    assert activation_bytes_saved(model, ids) <= plain


def test_stack_leaves_the_modules_it_cannot_stack_plain(make_lora, llama_dir) -> None:
    """LoRA dropout applies to ``A``'s input only, so a module with dropout stays a plain CatLinear."""
    from lorasoup.cat.layer import CatLinear

    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    compose_cat(model, adapters, parameterisation="softmax", seed=3, dropout=0.1)
    assert cat_stacked.stack(model) == 0
    assert not any(isinstance(m, cat_stacked.StackedCatLinear) for m in model.modules())
    assert any(isinstance(m, CatLinear) for m in model.modules())


def test_training_stacks_only_under_cuda_graphs_on_one_gpu(monkeypatch) -> None:
    from lorasoup.cat.fit import stacking_device
    from lorasoup.options import FitOptions

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert stacking_device(FitOptions(compile="reduce-overhead", device="cuda")) == "cuda"
    assert stacking_device(FitOptions(compile="reduce-overhead", device="cuda:1")) == "cuda:1"
    assert stacking_device(FitOptions(compile="default", device="cuda")) is None
    assert stacking_device(FitOptions(compile="reduce-overhead", device="cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate launch: DDP / FSDP processes
    assert stacking_device(FitOptions(compile="reduce-overhead", device="cuda")) is None


def test_stacked_training_learns_the_plain_weights_and_unstacks(make_lora, llama_dir, tokenizer, monkeypatch):
    """With stacking forced on (the CPU, eager), ``fit_cat_weights`` trains the θ the plain layer does,
    and the model it hands back holds plain CatLinear modules with their own weights."""
    import functools

    from lorasoup.cat import fit as cat_fit
    from lorasoup.cat.layer import CatLinear
    from lorasoup.options import FitOptions
    from lorasoup.training.data import build_dataset, collate

    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    records = [
        {"instruction": f"what is {a} plus {b} ?", "output": f"{a + b}"} for a in range(6) for b in range(4)
    ]
    dataset = build_dataset(records, tokenizer, template="plain", cutoff_len=64)
    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    options = FitOptions(learning_rate=0.1, max_steps=4, batch_size=8, warmup=0.0, device="cpu")
    thetas, seen = {}, []
    real_stack = cat_stacked.stack
    monkeypatch.setattr(cat_stacked, "stack", lambda model: seen.append(real_stack(model)) or seen[-1])
    for stacking in (False, True):
        device = "cpu" if stacking else None
        monkeypatch.setattr(cat_fit, "stacking_device", lambda options, device=device: device)
        composition = compose_cat(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, seed=3)
        cat_fit.fit_cat_weights(composition, dataset, collate_fn, options)
        thetas[stacking] = composition.weights.theta.detach().clone()
    assert seen == [len(composition.sites)]  # stacked once, every module
    torch.testing.assert_close(thetas[True], thetas[False], rtol=1e-5, atol=1e-6)
    layers = [m for m in composition.model.modules() if isinstance(m, CatLinear)]
    assert len(layers) == len(composition.sites)
    assert not any(isinstance(m, cat_stacked.StackedCatLinear) for m in composition.model.modules())
    for layer in layers:
        weight = layer.base.weight
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
