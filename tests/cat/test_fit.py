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
from tests.conftest import TINY_DECODER, on_gpu

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


def test_cuda_graph_training_marks_each_step_and_feeds_layers_inputs_that_require_grad(setup, monkeypatch):
    """train.compile=reduce-overhead: every micro-batch starts a new CUDA-graph iteration, and the
    embeddings' output requires grad (so the first decoder layer traces like the others; without it
    ``lorasoup cat`` failed on an H100); the hook is gone after training and θ is eager training's.
    The compile itself is replaced by the plain model: CUDA graphs need a GPU (``-m gpu`` covers them)."""
    from lorasoup.training import loop as fit_loop

    fresh, dataset, collate_fn = setup
    options = FitOptions(learning_rate=0.1, max_steps=3, batch_size=6, grad_accum=2, warmup=0.0)
    eager = fresh()
    fit_cat_weights(eager, dataset, collate_fn, options)

    graphed = fresh()
    marks, layer_inputs = [], []
    monkeypatch.setattr(fit_loop, "compiled", lambda model, mode: model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(layer_inputs)))
    first_layer = graphed.model.model.layers[0]
    first_layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0].requires_grad))
    fit_cat_weights(
        graphed, dataset, collate_fn, FitOptions(**{**vars(options), "compile": "reduce-overhead"})
    )

    assert marks == list(range(6))  # 3 steps of 2 micro-batches: one mark before each forward
    assert layer_inputs == [True] * 6
    torch.testing.assert_close(graphed.weights.theta, eager.weights.theta, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # after training: the embeddings are plain again
        embedded = graphed.model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert not embedded.requires_grad


@on_gpu
def test_cuda_graph_training_of_cat_runs_and_learns_the_eager_weights(make_lora, tmp_path, tokenizer):
    """``train.compile=reduce-overhead`` on CUDA, four decoder layers compiled one by one under CUDA
    graphs, inputs from a frozen embedding (as ``lorasoup cat`` runs; it failed on an H100 before the
    loop marked its steps and made the layers' inputs require grad): eager training's losses and θ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=0, **{**TINY_DECODER, "num_hidden_layers": 4}
    )
    base_dir = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    adapters = [
        load_adapter(make_lora(n, base_dir=base_dir, seed=s), name=n) for n, s in (("a", 1), ("b", 2))
    ]
    dataset = build_dataset(RECORDS, tokenizer, template="plain", cutoff_len=32)
    padded = functools.partial(collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=32)
    options = FitOptions(learning_rate=0.1, max_steps=6, batch_size=8, warmup=0.0, device="cuda")
    thetas, losses = {}, {}
    for mode in ("none", "reduce-overhead"):
        model = AutoModelForCausalLM.from_pretrained(base_dir).cuda()
        composition = compose_cat(model, adapters, seed=7)
        torch._dynamo.reset()
        options_now = FitOptions(**{**vars(options), "compile": mode})
        result = fit_cat_weights(composition, dataset, padded, options_now)
        losses[mode] = torch.tensor(result.losses)
        assert result.steps == 6 and torch.isfinite(losses[mode]).all()
        thetas[mode] = composition.weights.theta.detach().cpu()
    # fused kernels reorder sums (and a process may have TF32 on), and Adam moves a θ whose gradient
    # is near zero by about the learning rate whatever its sign: the loss curve is the like-for-like
    # check, θ's movement the loose one (a run that trained nothing, or something else, fails both)
    torch.testing.assert_close(losses["reduce-overhead"], losses["none"], rtol=0.02, atol=0)
    theta0 = composition.theta_init.cpu()
    moved = (thetas["none"] - theta0).norm()
    assert moved > 0 and (thetas["reduce-overhead"] - thetas["none"]).norm() < 0.25 * moved
