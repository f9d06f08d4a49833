"""The ``cudagraph`` backend on the CPU (its step runs eagerly): token for token what the HF path makes."""

import json

import pytest
import torch

from lorasoup.errors import ConfigError
from lorasoup.evaluation.generate import GenerationSettings, encode_prompt, generate
from lorasoup.evaluation.graph_decode import GraphGenerator, generate_graphed
from lorasoup.evaluation.runner import evaluate
from tests.conftest import build_gemma3, build_gpt2, build_llama, build_qwen2, on_gpu
from tests.evaluation.test_generate import PROMPTS
from tests.evaluation.test_runner import config_for, greedy, write_task  # noqa: F401 (greedy: fixture)

CASES = {
    "default": {"max_new_tokens": 12, "batch_size": 2},
    "ignore_eos": {"max_new_tokens": 9, "batch_size": 3, "ignore_eos": True},
    "unsorted": {"max_new_tokens": 6, "batch_size": 4, "sort_by_length": False},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(arch: str, vocab_size: int):
    builders = {"llama": build_llama, "gpt2": build_gpt2, "qwen2": build_qwen2, "gemma3": build_gemma3}
    model = builders[arch](vocab_size)
    model.generation_config.eos_token_id = 2  # GPT-2's default (50256) lies outside the tiny vocabulary
    return model


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build("llama", len(tokenizer))


def graphed(model, tokenizer, prompts=PROMPTS, **kwargs):
    """A generator that checks often and changes attention window every 16 columns (several graphs)."""
    return GraphGenerator(model, tokenizer, check_every=4, window_step=16, **kwargs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])  # gemma3: sliding-window layers
def test_greedy_equals_the_hf_path(arch, case, tokenizer):
    model = build(arch, len(tokenizer))
    settings = GenerationSettings(**CASES[case])
    expected = generate(model, tokenizer, PROMPTS, settings)
    generator = graphed(model, tokenizer)
    assert generator.generate(PROMPTS, settings) == expected
    assert generator.stats["captures"] == len(generator.state.graphs) > 1
    assert generator.stats["steps"] > 0


def raw_greedy(model, tokenizer, prompt: str, count: int) -> list[int]:
    """The ``count`` tokens ``model.generate`` picks greedily for ``prompt`` alone, EOS suppressed."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def test_rows_end_at_stop_strings_eos_and_length_as_on_the_hf_path(tokenizer):
    model = build("llama", len(tokenizer))
    raw = [raw_greedy(model, tokenizer, p, 24) for p in PROMPTS]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in raw]
    # a letter only one row writes (after its first character) becomes the stop string, and a token
    # only another row makes (among its tokens 3 to 12) an extra EOS: the other rows run to the limit
    stop_row, stop = next(
        (i, ch)
        for i, text in enumerate(texts)
        for ch in text[1:]
        if ch.isascii() and ch.isalpha() and sum(ch in t for t in texts) == 1
    )
    extra_eos = next(
        token
        for i, tokens in enumerate(raw)
        if i != stop_row
        for token in tokens[2:12]
        if sum(token in r for r in raw) == 1
    )
    model.generation_config.eos_token_id = [2, extra_eos]
    for batch_size in (2, 3, 5):
        settings = GenerationSettings(max_new_tokens=24, batch_size=batch_size, stop=[stop])
        expected = generate(model, tokenizer, PROMPTS, settings)
        assert {g.finish_reason for g in expected} == {"stop", "eos", "length"}, expected
        assert graphed(model, tokenizer).generate(PROMPTS, settings) == expected
    ignoring = GenerationSettings(max_new_tokens=24, batch_size=2, stop=[stop], ignore_eos=True)
    expected = generate(model, tokenizer, PROMPTS, ignoring)
    assert "eos" not in {g.finish_reason for g in expected}
    assert graphed(model, tokenizer).generate(PROMPTS, ignoring) == expected


def test_cache_and_graphs_serve_later_calls(llama, tokenizer):
    generator = graphed(llama, tokenizer)
    settings = GenerationSettings(max_new_tokens=10, batch_size=2)
    assert generator.generate(PROMPTS, settings) == generate(llama, tokenizer, PROMPTS, settings)
    state, graphs = generator.state, dict(generator.state.graphs)
    # fewer, shorter prompts: the same cache (a filler row completes the batch) and no new capture
    short = ["the cat", "0 1", "def"]
    assert generator.generate(short, settings) == generate(llama, tokenizer, short, settings)
    assert generator.state is state and generator.stats["captures"] == 0
    assert all(generator.state.graphs[w] is step for w, step in graphs.items())
    # more rows or columns than the cache holds: a new cache
    longer = GenerationSettings(max_new_tokens=100, batch_size=2)
    assert generator.generate(short, longer) == generate(llama, tokenizer, short, longer)
    assert generator.state is not state and generator.state.length > state.length
    generator.release()
    assert generator.state is None


def test_whole_cache_window_and_eager_decode_attention_agree(llama, tokenizer):
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    expected = generate(llama, tokenizer, PROMPTS, settings)
    whole = GraphGenerator(llama, tokenizer, window_step=0)
    assert whole.generate(PROMPTS, settings) == expected
    assert list(whole.state.graphs) == [whole.state.length]
    eager = graphed(llama, tokenizer, decode_attention="eager")
    assert eager.generate(PROMPTS, settings) == expected
    assert llama.config._attn_implementation == "sdpa"  # switched for the decoding steps only
    assert generate_graphed(llama, tokenizer, PROMPTS, settings) == expected


def test_peft_model_equals_the_hf_path(tokenizer, make_lora):
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(build_llama(len(tokenizer)), make_lora("a")).eval()
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    expected = generate(wrapped, tokenizer, PROMPTS, settings)
    assert graphed(wrapped, tokenizer).generate(PROMPTS, settings) == expected
    assert expected != generate(build_llama(len(tokenizer)), tokenizer, PROMPTS, settings)


def test_what_it_cannot_serve_is_refused(llama, tokenizer):
    with pytest.raises(ConfigError, match="decodes greedily; use backend 'hf'"):
        graphed(llama, tokenizer).generate(PROMPTS, GenerationSettings(do_sample=True))
    sliding = build("qwen2", len(tokenizer))
    sliding.config.sliding_window = 8
    with pytest.raises(ConfigError, match="sliding window of 8 tokens"):
        graphed(sliding, tokenizer).generate(PROMPTS, GenerationSettings(max_new_tokens=4))
    gemma = build("gemma3", len(tokenizer))
    gemma.config.sliding_window = 8  # its sliding layers would not see every cache column
    with pytest.raises(ConfigError, match="sliding window of 8 tokens"):
        graphed(gemma, tokenizer).generate(PROMPTS, GenerationSettings(max_new_tokens=4))
    sliding.config.sliding_window = None
    sliding.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ConfigError, match="full-attention layers only"):
        graphed(sliding, tokenizer).generate(PROMPTS, GenerationSettings(max_new_tokens=4))
    flex = build("llama", len(tokenizer))
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="needs attn_implementation 'sdpa' or 'eager'"):
        graphed(flex, tokenizer).generate(PROMPTS, GenerationSettings(max_new_tokens=4))
    with pytest.raises(ConfigError, match="window_step"):
        GraphGenerator(llama, tokenizer, window_step=12)
    with pytest.raises(ConfigError, match="CUDA device"):
        GraphGenerator(llama, tokenizer, capture=True)


def test_eval_with_backend_cudagraph_equals_backend_hf(llama_dir, tmp_path, greedy):  # noqa: F811
    task, _ = write_task(tmp_path, greedy)
    hf = evaluate(config_for(llama_dir, task, tmp_path / "hf"))
    graph = evaluate(config_for(llama_dir, task, tmp_path / "graph", backend="cudagraph"))
    assert [r.generation for r in graph.results] == [r.generation for r in hf.results]
    assert graph.summary["accuracy"] == hf.summary["accuracy"]
    assert json.loads((tmp_path / "graph" / "run.json").read_text())["model"]["backend"] == "cudagraph"
    sampled = {"backend": "cudagraph", "generation": {"sampling": "paper"}}
    with pytest.raises(ConfigError, match="decodes greedily"):
        evaluate(config_for(llama_dir, task, tmp_path / "s", **sampled))


@on_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_graphs_replay_what_the_eager_step_and_the_hf_path_make_on_cuda(arch, tokenizer):
    """On a GPU the decoding step is captured and replayed: in fp32 its tokens are those of the same
    step run eagerly and of the HF path, several windows (graphs) and batches included."""
    model = build(arch, len(tokenizer)).to("cuda")
    settings = GenerationSettings(max_new_tokens=20, batch_size=2)
    captured = graphed(model, tokenizer)
    assert captured.capture
    replayed = captured.generate(PROMPTS, settings)
    assert captured.stats["captures"] > 1
    assert replayed == graphed(model, tokenizer, capture=False).generate(PROMPTS, settings)
    assert replayed == generate(model, tokenizer, PROMPTS, settings)
