"""Batched generation on the tiny Llama: batching, caches, stop strings, seeded sampling, vLLM glue."""

import sys
import types

import pytest
import torch

from lorasoup.errors import ConfigError, DataError
from lorasoup.evaluation.generate import (
    PAPER_SAMPLING,
    GenerationOptions,
    GenerationSettings,
    generate,
    left_pad,
    truncate_at_stop,
)
from tests.conftest import build_llama

PROMPTS = [
    "the cat sat",
    "what is 12 plus 7 ? the answer is",
    "def",
    "below is an instruction that describes a task . write a response",
    "0 1 2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_llama(len(tokenizer))


def run(model, tokenizer, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    return generate(model, tokenizer, PROMPTS, GenerationSettings(**kwargs))


def test_batched_greedy_equals_one_by_one(model, tokenizer):
    batched = run(model, tokenizer, batch_size=5)
    single = run(model, tokenizer, batch_size=1)
    unsorted = run(model, tokenizer, batch_size=2, sort_by_length=False)
    assert [g.text for g in batched] == [g.text for g in single] == [g.text for g in unsorted]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in single]
    # results come back in the prompts' order: each prompt alone gives its own row
    alone = generate(model, tokenizer, [PROMPTS[3]], GenerationSettings(max_new_tokens=10))
    assert alone[0] == batched[3]
    assert [g.prompt_tokens for g in batched] == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]


def test_static_cache_equals_dynamic(model, tokenizer):
    dynamic = run(model, tokenizer, batch_size=3)
    static = run(model, tokenizer, batch_size=3, cache_implementation="static")
    assert [g.text for g in static] == [g.text for g in dynamic]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_truncate_at_stop_takes_the_earliest():
    assert truncate_at_stop("abc###def\n\nxyz", ["\n\n", "###"]) == ("abc", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_stop_strings_cut_the_text_and_stop_the_row(model, tokenizer):
    full = run(model, tokenizer, max_new_tokens=24, ignore_eos=True)
    # an ASCII character the longest row writes after its first few tokens
    row, stop = next(
        (i, ch)
        for i, g in enumerate(full)
        for ch in g.text[3:]
        if ch.isascii() and ch.isprintable() and ch != " "
    )
    stopped = run(model, tokenizer, max_new_tokens=24, ignore_eos=True, stop=[stop])
    cut = full[row].text.find(stop)
    assert stopped[row].text == full[row].text[:cut]
    assert stopped[row].finish_reason == "stop"
    assert stopped[row].new_tokens < full[row].new_tokens == 24
    for before, after in zip(full, stopped, strict=True):
        assert after.text == truncate_at_stop(before.text, [stop])[0]


def test_ignore_eos_runs_every_row_to_the_limit(model, tokenizer):
    out = run(model, tokenizer, max_new_tokens=7, ignore_eos=True)
    assert all(g.new_tokens == 7 and g.finish_reason == "length" for g in out)


def test_seeded_sampling_is_batch_independent_and_leaves_the_global_rng(model, tokenizer):
    state = torch.get_rng_state()
    a = run(model, tokenizer, batch_size=5, do_sample=True, seed=3)
    b = run(model, tokenizer, batch_size=1, do_sample=True, seed=3)
    c = run(model, tokenizer, batch_size=5, do_sample=True, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    assert [g.text for g in a] != [g.text for g in run(model, tokenizer, batch_size=5)]


def test_near_zero_temperature_samples_the_greedy_path(model, tokenizer):
    cold = run(model, tokenizer, do_sample=True, temperature=1e-4, top_p=0.95)
    assert [g.text for g in cold] == [g.text for g in run(model, tokenizer)]


def test_peft_model_generates(model, tokenizer, make_lora):
    from peft import PeftModel

    adapter = make_lora("a")
    wrapped = PeftModel.from_pretrained(build_llama(len(tokenizer)), adapter).eval()
    with_lora = run(wrapped, tokenizer, batch_size=2)
    assert [g.text for g in with_lora] == [g.text for g in run(wrapped, tokenizer, batch_size=1)]
    assert [g.text for g in with_lora] != [g.text for g in run(model, tokenizer)]


def test_prompt_longer_than_the_context_is_refused(model, tokenizer):
    with pytest.raises(DataError, match="exceeds the model's context of 128"):
        generate(model, tokenizer, ["the cat sat " * 30], GenerationSettings(max_new_tokens=8))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, tokenizer, ["x"], GenerationSettings(max_new_tokens=0))


def test_options_layer_over_settings():
    base = GenerationSettings(max_new_tokens=100, stop=["###"])
    paper = GenerationOptions(sampling="paper").apply(base)
    assert (paper.do_sample, paper.temperature, paper.top_p) == tuple(PAPER_SAMPLING.values())
    assert paper.max_new_tokens == 100 and paper.stop == ["###"]
    tuned = GenerationOptions(sampling="paper", temperature=0.7, batch_size=2).apply(base)
    assert (tuned.temperature, tuned.batch_size) == (0.7, 2)
    assert GenerationOptions(sampling="greedy").apply(paper).do_sample is False
    with pytest.raises(ConfigError, match="top_p"):
        GenerationOptions(top_p=1.5).apply(base)


def test_vllm_missing_gives_one_line_hint(monkeypatch, tokenizer):
    from lorasoup.evaluation.vllm_backend import VllmGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ConfigError, match="pip install vllm, or use --backend hf"):
        VllmGenerator("some/model", tokenizer)


def test_vllm_glue_maps_settings_and_outputs(monkeypatch, tokenizer, make_lora):
    """A stand-in ``vllm`` module records what lorasoup asks of it (vLLM itself needs a GPU)."""
    from lorasoup.evaluation.vllm_backend import VllmGenerator

    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, requests, params, lora_request=None, use_tqdm=True):
            calls.update(requests=requests, params=params, lora=lora_request)
            done = types.SimpleNamespace(
                text="4 ###", token_ids=[1, 2, 3], finish_reason="stop", stop_reason=None
            )
            cut = types.SimpleNamespace(
                text="abc", token_ids=[1] * 9, finish_reason="length", stop_reason=None
            )
            return [types.SimpleNamespace(outputs=[done]), types.SimpleNamespace(outputs=[cut])]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, number, path: (name, number, path)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)

    adapter = make_lora("served", r=12)
    engine = VllmGenerator("base/model", tokenizer, adapter=str(adapter), seed=5)
    assert calls["engine"]["max_lora_rank"] == 16 and calls["engine"]["enable_lora"] is True
    out = engine.generate(["2 + 2 =", "hi"], GenerationSettings(max_new_tokens=9, stop=["###"]))
    assert calls["lora"] == ("adapter", 1, str(adapter))
    assert calls["requests"][0]["prompt_token_ids"] == tokenizer("2 + 2 =")["input_ids"]
    greedy = calls["params"][0]
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 9 and greedy["stop"] == ["###"]
    assert [(g.text, g.finish_reason, g.new_tokens) for g in out] == [("4 ", "stop", 3), ("abc", "length", 9)]
    engine.generate(["a", "b"], GenerationSettings(do_sample=True, temperature=0.1, top_p=0.95))
    assert (
        calls["params"][0]["temperature"] == 0.1 and calls["params"][0]["seed"] != calls["params"][1]["seed"]
    )
