"""The real-model study's scorer: the GSM-Hard column (the paper's 8-shot prompt, the sandbox), the
CUDA-graph backend with its recorded fallback, and the table's columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.real_study import RealDemoSettings, gsm_hard_task, task_specs, tasks
from lorasoup.demo.scoring import Scorer
from tests.conftest import build_llama

DATA = Path(__file__).parents[1] / "data" / "lora-soups"
RECORD = {"instruction": "2 + 3", "output": "```python\ndef solution():\n    return 5\n```", "value": 5}


@pytest.fixture
def settings() -> RealDemoSettings:
    return RealDemoSettings(
        template="plain", gsm_hard_data=str(DATA), gsm_hard_limit=3, program_tokens=4, math_tokens=4,
        code_tokens=4, eval_batch_size=2, gsm_hard_batch_size=2, device="cpu",
    )  # fmt: skip


def scorer_for(settings: RealDemoSettings, tokenizer, out: Path) -> Scorer:
    benchmark = Benchmark(base=[], train={}, test={"composite": [RECORD], "math": [RECORD], "code": [RECORD]})
    scorer = Scorer(benchmark, tokenizer, settings, out, specs=task_specs(settings))
    scorer.add_task("gsm-hard", *gsm_hard_task(settings), batch_size=settings.gsm_hard_batch_size)
    return scorer


def test_the_columns_follow_the_settings() -> None:
    assert tasks(RealDemoSettings()) == ("composite", "math", "code")
    assert tasks(RealDemoSettings(gsm_hard_data="data")) == ("composite", "math", "code", "gsm-hard")


def test_gsm_hard_reads_the_papers_prompt_and_the_first_problems(settings: RealDemoSettings) -> None:
    task, examples = gsm_hard_task(settings)
    assert len(examples) == 3 and task.spec.name == "gsm-hard"
    prompt = task.prompt(examples[0])
    assert prompt.startswith("Let's use Python to solve math problems step by step.")
    demos = json.loads((DATA / "few_shot_demo" / "math.json").read_text())
    assert (
        prompt.count("### Instruction:") == len(demos) + 1
    )  # every demo (8 in the paper), then the question
    assert prompt.endswith(f"### Instruction:\n{examples[0].fields['instruction']}\n\n### Response:\n")


@pytest.fixture(scope="module")
def long_llama(tokenizer) -> torch.nn.Module:
    """The tiny test Llama with room for GSM-Hard's few-shot prompt (~1,500 characters here)."""
    model = build_llama(len(tokenizer))
    model.config.max_position_embeddings = 2048
    model.config._attn_implementation = "sdpa"
    return model


def test_both_backends_score_every_task_alike(settings, tokenizer, long_llama, tmp_path: Path) -> None:
    model = long_llama
    scores = {}
    for backend in ("hf", "cudagraph"):  # on a CPU the graph backend steps eagerly: same greedy tokens
        scorer = scorer_for(RealDemoSettings(**{**vars(settings), "eval_backend": backend}), tokenizer,
                            tmp_path / backend)  # fmt: skip
        scores[backend] = scorer.score("base model", model)
        assert scorer.fallbacks == []
        timed = scorer.timings["base model"]  # where the row's time went, per task, for run records
        assert set(timed) == {"composite", "math", "code", "gsm-hard"}
        assert all(
            t["backend"] == backend and t["new_tokens"] > 0 and t["generate_s"] > 0 for t in timed.values()
        )
        written = (tmp_path / backend / "base-model" / "gsm-hard.jsonl").read_text().splitlines()
        assert len(written) == 3 and {"prompt", "generation"} <= set(json.loads(written[0]))
    assert set(scores["hf"]) == {"composite", "math", "code", "gsm-hard"}
    generations = {
        b: [
            json.loads(line)["generation"] for line in (tmp_path / b / "base-model" / "gsm-hard.jsonl").open()
        ]
        for b in scores
    }
    assert generations["hf"] == generations["cudagraph"] and scores["hf"] == scores["cudagraph"]


def test_a_model_the_graph_backend_refuses_is_scored_by_hf_and_recorded(
    settings, tokenizer, long_llama, tmp_path: Path
) -> None:
    model = long_llama
    reference = scorer_for(settings, tokenizer, tmp_path / "hf").score("m", model)
    model.config.add_cross_attention = True  # the graph step serves decoder-only models; hf ignores it
    graphed = RealDemoSettings(**{**vars(settings), "eval_backend": "cudagraph"})
    scorer = scorer_for(graphed, tokenizer, tmp_path / "graphed")
    try:
        assert scorer.score("m", model) == reference
    finally:
        model.config.add_cross_attention = False
    # refused once, the model's other tasks go straight to hf: one fallback, not one per task
    assert len(scorer.fallbacks) == 1 and "decoder-only" in scorer.fallbacks[0]
    assert scorer.fallbacks[0].startswith("m / composite: ")
    assert scorer.score("m2", model) == reference and len(scorer.fallbacks) == 1  # the next model: graphs


def test_merged_scoring_scores_a_peft_row_as_the_merged_model(
    settings, tokenizer, tmp_path, monkeypatch
) -> None:
    """``merged_scoring``: a PEFT adapter row is scored with its LoRA folded into the weights (no LoRA
    layer left in the model that generates) and, in fp32 on a CPU, to the same generations."""
    from peft import LoraConfig, get_peft_model

    from lorasoup.evaluation import runner

    def with_lora() -> torch.nn.Module:  # the same random base and LoRA each time
        torch.manual_seed(0)
        base = build_llama(len(tokenizer))
        base.config.max_position_embeddings = 2048
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(base, lora).eval()

    generated_by = []
    evaluate = runner.evaluate_model

    def spy(model, *args, **kwargs):
        generated_by.append(hasattr(model, "peft_config"))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_model", spy)
    plain = scorer_for(settings, tokenizer, tmp_path / "plain").score("lora", with_lora())
    merged_settings = RealDemoSettings(**{**vars(settings), "merged_scoring": True})
    merged = scorer_for(merged_settings, tokenizer, tmp_path / "merged").score("lora", with_lora())
    assert generated_by == [True] * 4 + [False] * 4  # four tasks each: PEFT-wrapped, then merged
    assert merged == plain

    def generations(folder: str) -> list[str]:
        lines = (tmp_path / folder / "lora" / "gsm-hard.jsonl").read_text().splitlines()
        return [json.loads(line)["generation"] for line in lines]

    assert generations("merged") == generations("plain")
