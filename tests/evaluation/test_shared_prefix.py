"""Shared-prefix decoding: the split attention equals attention over the concatenation, and the
``cudagraph`` backend with a shared prefix makes the HF path's tokens."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.evaluation.generate import GenerationSettings, encode_prompt, generate
from lorasoup.evaluation.shared_prefix import (
    attend_decode_fused,
    attend_with_prefix,
    common_prefix_length,
    fused_decode_supported,
    prefix_attention,
)
from tests.conftest import build_llama, on_gpu
from tests.evaluation.test_graph_decode import build, graphed
from tests.evaluation.test_graph_decode import llama as llama  # a fixture
from tests.evaluation.test_runner import greedy as greedy  # a fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEMO = "below is an instruction that describes a task . write a response : "
QUESTIONS = ["what is 12 plus 7 ?", "def", "0 1 2 3 4", "the cat sat", "x"]
FEW_SHOT = [DEMO + q for q in QUESTIONS]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    steps=st.integers(1, 4),
    shared=st.integers(1, 6),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_split_attention_equals_attention_over_the_concatenation(
    batch, kv_heads, group, steps, shared, width, seed
):
    g = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * group, 4
    query = torch.randn(batch, heads, steps, dim, generator=g, dtype=torch.float64)
    prefix_k, prefix_v = (torch.randn(kv_heads, shared, dim, generator=g, dtype=torch.float64) for _ in "kv")
    keys, values = (torch.randn(batch, kv_heads, width, dim, generator=g, dtype=torch.float64) for _ in "kv")
    hidden = torch.rand(batch, 1, steps, width, generator=g) < 0.4  # any pattern, whole rows included
    mask = torch.zeros(hidden.shape, dtype=torch.float64).masked_fill_(hidden, torch.finfo(torch.float64).min)
    ours = attend_with_prefix(query, prefix_k, prefix_v, keys, values, mask, 0.5)

    # the reference: every row's own copy of the prefix in front of its columns, heads repeated
    whole_k = torch.cat([prefix_k.expand(batch, -1, -1, -1), keys], 2).repeat_interleave(group, 1)
    whole_v = torch.cat([prefix_v.expand(batch, -1, -1, -1), values], 2).repeat_interleave(group, 1)
    whole_mask = torch.cat([torch.zeros(batch, 1, steps, shared, dtype=torch.float64), mask], -1)
    scores = (query @ whole_k.transpose(-1, -2)) * 0.5 + whole_mask
    expected = (scores.softmax(-1) @ whole_v).transpose(1, 2)
    assert ours.shape == (batch, steps, heads, dim)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([16, 32]),
    shared=st.integers(1, 600),
    width=st.integers(1, 150),
    seed=st.integers(0, 2**16),
)
def test_fused_decode_kernels_equal_the_split_attention(
    triton_interpreter, batch, kv_heads, group, dim, shared, width, seed
):
    """The two Triton kernels (run by Triton's interpreter, float32) compute what the torch split
    attention computes for one decoding step: prefixes across several chunks, windows across
    several blocks, a cache longer than the window, masked columns."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    prefix_k, prefix_v = (torch.randn(kv_heads, shared, dim, generator=g) for _ in "kv")
    cache_k, cache_v = (torch.randn(batch, kv_heads, width + 9, dim, generator=g) for _ in "kv")
    hidden = torch.rand(batch, 1, 1, width + 9, generator=g) < 0.4
    hidden[..., width - 1] = False  # the token being decoded sees itself
    mask = torch.zeros(hidden.shape).masked_fill_(hidden, torch.finfo(torch.float32).min)[..., :width]
    keys, values = cache_k[:, :, :width], cache_v[:, :, :width]
    assert fused_decode_supported(query, prefix_k)
    fused = attend_decode_fused(query, prefix_k, prefix_v, keys, values, mask, 0.3)
    expected = attend_with_prefix(query, prefix_k, prefix_v, keys, values, mask, 0.3)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_fused_decode_serves_one_step_and_tl_dot_head_sizes():
    prefix = torch.zeros(2, 5, 16)
    assert fused_decode_supported(torch.zeros(1, 2, 1, 16), prefix) == (
        importlib.util.find_spec("triton") is not None
    )
    assert not fused_decode_supported(torch.zeros(1, 2, 3, 16), prefix)  # a prefill, not one step
    assert not fused_decode_supported(torch.zeros(1, 2, 1, 8), torch.zeros(2, 5, 8))  # tl.dot needs 16+
    assert not fused_decode_supported(torch.zeros(1, 2, 1, 48), torch.zeros(2, 5, 48))  # not a power of 2


@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=1, max_size=4))
def test_common_prefix_is_shared_by_all_and_leaves_each_row_a_token(rows):
    length = common_prefix_length(rows)
    shortest = min(len(r) for r in rows)
    assert 0 <= length <= shortest - 1
    assert all(r[:length] == rows[0][:length] for r in rows)
    if length < shortest - 1:  # could not go further: two rows differ at the next token
        assert len({r[length] for r in rows}) > 1


def test_the_attention_function_refuses_what_it_does_not_compute():
    module = type("Attention", (), {"layer_idx": 0})()
    query = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match="needs the shared_prefix keyword"):
        prefix_attention(module, query, query, query, torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="without dropout"):
        prefix_attention(
            module, query, query, query, torch.zeros(1, 1, 1, 1), shared_prefix=object(), dropout=0.1
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])
def test_prompts_sharing_a_prefix_make_the_hf_paths_tokens(arch, tokenizer):
    model = build(arch, len(tokenizer))
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    expected = generate(model, tokenizer, FEW_SHOT, settings)
    generator = graphed(model, tokenizer)
    assert generator.generate(FEW_SHOT, settings) == expected
    shared = common_prefix_length([encode_prompt(tokenizer, p) for p in FEW_SHOT])
    assert generator.stats["shared_prefix_tokens"] == shared >= len(DEMO) - 2
    # the per-row cache holds suffixes and continuations only
    assert generator.state.length < shared
    # the Triton kernels serve CUDA only: on a CPU the same split attention runs
    assert graphed(model, tokenizer, prefix_kernel="triton").generate(FEW_SHOT, settings) == expected
    off = graphed(model, tokenizer, min_shared_prefix=0)
    assert off.generate(FEW_SHOT, settings) == expected
    assert off.stats["shared_prefix_tokens"] == 0 and off.prefix is None


def test_a_kept_prefix_serves_later_calls_and_a_new_one_recaptures(llama, tokenizer):
    generator = graphed(llama, tokenizer)
    settings = GenerationSettings(max_new_tokens=10, batch_size=2)
    generator.generate(FEW_SHOT[:3], settings)
    prefix, graphs = generator.prefix, dict(generator.state.graphs)
    later = FEW_SHOT[3:]
    assert generator.generate(later, settings) == generate(llama, tokenizer, later, settings)
    assert generator.prefix is prefix and generator.stats["captures"] == 0
    assert all(generator.state.graphs[w] is step for w, step in graphs.items())
    # another prefix: the graphs read the old one's tensors, so they are captured again
    other = ["the answer to every question is : " + q for q in QUESTIONS]
    assert generator.generate(other, settings) == generate(llama, tokenizer, other, settings)
    assert generator.prefix is not prefix and generator.stats["captures"] > 0
    # prompts that share too little decode without a prefix (and the graphs follow)
    assert generator.generate([*FEW_SHOT[:1], "0 1"], settings) == generate(
        llama, tokenizer, [*FEW_SHOT[:1], "0 1"], settings
    )
    assert generator.stats["shared_prefix_tokens"] == 0 and generator.state.prefix is None


def test_a_broken_prefix_would_show(llama, tokenizer):
    """The prefix's keys and values are read: perturbing them changes what is generated."""
    generator = graphed(llama, tokenizer)
    settings = GenerationSettings(max_new_tokens=10, batch_size=5)
    expected = generator.generate(FEW_SHOT, settings)
    with torch.inference_mode():  # the prefix was made under inference mode
        for values in generator.prefix.values:
            values.mul_(-3.0)
    assert generator.generate(FEW_SHOT, settings) != expected


def test_peft_model_with_a_shared_prefix_equals_the_hf_path(tokenizer, make_lora):
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(build_llama(len(tokenizer)), make_lora("a")).eval()
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    generator = graphed(wrapped, tokenizer)
    assert generator.generate(FEW_SHOT, settings) == generate(wrapped, tokenizer, FEW_SHOT, settings)
    assert generator.stats["shared_prefix_tokens"] > 0


@on_gpu
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_graphs_with_a_shared_prefix_equal_the_hf_path_on_cuda(arch, kernel, tokenizer):
    """fp32 on a GPU, a head size of 16 (the fused kernels' smallest): captured steps with the shared
    prefix, by torch operations or the Triton kernels, make the eager step's and the HF path's tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import TINY_DECODER

    torch.manual_seed(0)
    shape = {**TINY_DECODER, "hidden_size": 64, "intermediate_size": 128}  # 4 heads of 16
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(vocab_size=len(tokenizer), **shape)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(config).eval().to("cuda")
    model.generation_config.eos_token_id = 2
    settings = GenerationSettings(max_new_tokens=20, batch_size=2)
    captured = graphed(model, tokenizer, prefix_kernel=kernel)
    replayed = captured.generate(FEW_SHOT, settings)
    assert captured.capture and captured.stats["shared_prefix_tokens"] > 0
    eager = graphed(model, tokenizer, capture=False, prefix_kernel=kernel).generate(FEW_SHOT, settings)
    assert replayed == eager
    assert replayed == generate(model, tokenizer, FEW_SHOT, settings)


def test_eval_with_a_shared_prefix_records_it_and_equals_backend_hf(llama_dir, tmp_path, greedy):
    import json

    import yaml

    from lorasoup.evaluation.runner import evaluate
    from tests.evaluation.test_runner import config_for, write_task

    task, _ = write_task(tmp_path, greedy)
    spec = yaml.safe_load(task.read_text())
    spec["prompt"] = DEMO + "{question}"  # every prompt now starts with the same ~60 tokens
    task.write_text(yaml.safe_dump(spec))
    hf = evaluate(config_for(llama_dir, task, tmp_path / "hf"))
    graph = evaluate(config_for(llama_dir, task, tmp_path / "graph", backend="cudagraph"))
    assert [r.generation for r in graph.results] == [r.generation for r in hf.results]
    model = json.loads((tmp_path / "graph" / "run.json").read_text())["model"]
    assert model["backend"] == "cudagraph" and model["shared_prefix_tokens"] >= len(DEMO) - 2
    assert "shared_prefix_tokens" not in json.loads((tmp_path / "hf" / "run.json").read_text())["model"]


def test_a_model_that_keeps_keywords_from_its_attention_decodes_without_sharing(tokenizer):
    """A forward that does not pass keyword arguments down cannot reach the shared-prefix attention:
    the generator notices at the first prefill and decodes every row on its own from then on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_DECODER

    class Swallowing(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **ignored):  # fmt: skip
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
            )

    plain = build_llama(len(tokenizer))
    model = Swallowing(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, **TINY_DECODER)).eval()
    model.load_state_dict(plain.state_dict())
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    generator = graphed(model, tokenizer)
    # (HF's own generate needs the keywords this forward drops: the plain model is the reference)
    assert generator.generate(FEW_SHOT, settings) == generate(plain, tokenizer, FEW_SHOT, settings)
    assert generator.stats["shared_prefix_tokens"] == 0 and generator.min_shared_prefix == 0
