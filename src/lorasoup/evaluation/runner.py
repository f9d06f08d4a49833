"""``lorasoup eval``, end to end: load, prompt, generate, extract, score, write; resumable.

Two entry points:

* :func:`evaluate_model` scores a model held in memory (no loading, no files): a demo or a notebook
  passes its model, tokenizer, task and examples and gets per-example results and a summary.
* :func:`evaluate` runs a config: loads the base model (+ PEFT adapter) or a vLLM engine, and writes
  the artifact directory ``OUTPUT/``:

  - ``examples.jsonl`` — one record per example, in dataset order (prompt, generation, extracted
    answer, reference, verdict, correct, scores, token counts; see ``results.ExampleResult``);
  - ``summary.json`` — accuracy, metric means, verdicts, subsets, across-subset spread, throughput;
  - ``summary.md`` — the same as Markdown tables; ``run.json`` — config, versions, inputs' hashes,
    timings.

  The work happens in ``OUTPUT.partial/``: each chunk of examples is appended to its
  ``examples.jsonl`` (flushed and fsynced) as soon as it is scored. A rerun of the same config
  resumes there, skipping the ids already done; a run whose settings changed refuses to mix its
  records with the old ones. ``OUTPUT/`` appears, by one rename, only when everything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.artifacts import (
    atomic_file,
    inputs_fingerprint,
    replace_dir,
    require_free_output,
    run_record,
    to_jsonable,
    write_json_atomic,
)
from lorasoup.errors import ConfigError, DataError
from lorasoup.evaluation.config import EvalRunConfig
from lorasoup.evaluation.generate import GenerateFn, Generation, GenerationSettings
from lorasoup.evaluation.results import ExampleResult, markdown_report, summarise
from lorasoup.evaluation.tasks import Example, SandboxOptions, Task, get_task_spec, resolve_inputs
from lorasoup.evaluation.tasks.scoring import scoring_record

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lorasoup.evaluation.sandbox import ProgramCache

EXAMPLES_FILE = "examples.jsonl"
FINGERPRINT_FILE = "fingerprint.json"
ProgressHook = Callable[[int, int, float], None]
"""``(examples done, examples total, accuracy so far)``."""


@dataclass
class EvalOutcome:
    """What :func:`evaluate_model` returns: results in the examples' order, summary, throughput."""

    results: list[ExampleResult]
    summary: dict[str, Any]
    throughput: dict[str, Any]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns."""

    output: Path
    summary: dict[str, Any]
    results: list[ExampleResult]
    throughput: dict[str, Any]
    resumed: int = 0
    notices: list[str] = field(default_factory=list)


def task_settings(task: Task) -> GenerationSettings:
    """The task's default decoding: ``GenerationSettings()`` with the task's ``generation`` laid over."""
    return task.spec.generation.apply(GenerationSettings())


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | str,
    examples: Sequence[Example],
    settings: GenerationSettings | None = None,
    *,
    sandbox: SandboxOptions | None = None,
    progress: ProgressHook | None = None,
    backend: str = "hf",
    program_cache: ProgramCache | None = None,
) -> EvalOutcome:
    """Score an in-memory model on ``examples`` (from ``task.load(...)`` or ``task.examples(rows)``).

    ``task`` may be a registered task name if it needs no few-shot file; ``settings`` defaults to the
    task's own; ``backend`` is ``hf`` or ``cudagraph`` (greedy; graphs on CUDA, eager steps elsewhere);
    ``program_cache``: one ``sandbox.ProgramCache`` shared by the calls that score several models on
    one test set runs each distinct program once. Nothing is written.
    """
    from lorasoup.evaluation.backends import model_generator

    if isinstance(task, str):
        task = Task(get_task_spec(task))
    settings = settings or task_settings(task)
    run = model_generator(backend, model, tokenizer)
    results, throughput = run_examples(
        run, tokenizer, task, examples, settings,
        sandbox=sandbox, progress=progress, program_cache=program_cache,
    )  # fmt: skip
    return EvalOutcome(results, summarise(results, task.spec), throughput)


def run_examples(
    generate_fn: GenerateFn,
    tokenizer: PreTrainedTokenizerBase | None,
    task: Task,
    examples: Sequence[Example],
    settings: GenerationSettings,
    *,
    sandbox: SandboxOptions | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[list[ExampleResult]], None] | None = None,
    progress: ProgressHook | None = None,
    program_cache: ProgramCache | None = None,
) -> tuple[list[ExampleResult], dict[str, Any]]:
    """Generate and score in chunks (longest prompts first), handing each scored chunk to ``on_chunk``.

    Returns the results in the examples' order and this call's throughput.
    """
    prompts = [task.prompt(example, tokenizer) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    size = chunk_size or settings.batch_size  # progress and the work file move per generation batch
    by_index: dict[int, ExampleResult] = {}
    clock = {"generate_s": 0.0, "score_s": 0.0, "new_tokens": 0, "prompt_tokens": 0}
    correct = 0
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        began = time.perf_counter()
        generations = generate_fn([prompts[i] for i in chunk], settings)
        generated = time.perf_counter()
        texts = [g.text for g in generations]
        scored = task.score([examples[i] for i in chunk], texts, sandbox, program_cache)
        clock["generate_s"] += generated - began
        clock["score_s"] += time.perf_counter() - generated
        batch = [
            _result(examples[i], prompts[i], g, s) for i, g, s in zip(chunk, generations, scored, strict=True)
        ]
        for i, result in zip(chunk, batch, strict=True):
            by_index[i] = result
            correct += result.correct
            clock["new_tokens"] += result.new_tokens
            clock["prompt_tokens"] += result.prompt_tokens
        if on_chunk is not None:
            on_chunk(batch)
        if progress is not None:
            progress(len(by_index), len(examples), correct / len(by_index))
    return [by_index[i] for i in range(len(examples))], _throughput(len(examples), clock)


def _result(example: Example, prompt: str, generation: Generation, scored: Any) -> ExampleResult:
    return ExampleResult(
        id=example.id,
        subset=example.subset,
        index=example.index,
        prompt=prompt,
        generation=generation.text,
        extracted=scored.extracted,
        reference=example.reference,
        verdict=scored.verdict,
        correct=bool(scored.correct),
        scores=dict(scored.scores),
        detail=scored.detail,
        prompt_tokens=generation.prompt_tokens,
        new_tokens=generation.new_tokens,
        finish_reason=generation.finish_reason,
        notes=dict(example.notes),
        echo=dict(scored.echo),
    )


def _throughput(count: int, clock: dict[str, float]) -> dict[str, Any]:
    total = clock["generate_s"] + clock["score_s"]
    return {
        "examples": count,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in clock.items()},
        "examples_per_s": count / total if total > 0 else 0.0,
        "tokens_per_s": clock["new_tokens"] / clock["generate_s"] if clock["generate_s"] > 0 else 0.0,
    }


def evaluate(config: EvalRunConfig, progress: ProgressHook | None = None) -> EvalResult:
    """Run ``config`` and write its artifact directory (see the module doc)."""
    began = time.perf_counter()
    spec = get_task_spec(config.task)
    inputs = resolve_inputs(spec, config.data, config.fewshot, config.num_fewshot)
    task = Task.from_inputs(spec, inputs, config.num_fewshot)
    settings = config.generation.apply(task_settings(task))
    if config.backend == "cudagraph" and settings.do_sample:  # before minutes of model loading
        raise ConfigError("backend 'cudagraph' decodes greedily; use backend 'hf' (--backend hf) to sample")
    examples = task.load(inputs.data, limit=config.limit)
    if config.adapter:  # a missing or corrupt (NaN / inf) adapter fails before anything is written
        from lorasoup.adapters import check_finite_weights

        check_finite_weights(config.adapter)
    output = Path(config.output or f"runs/eval/{spec.name}")
    require_free_output(output, overwrite=config.overwrite)
    work = output.with_name(output.name + ".partial")
    read_files = [*inputs.data, *([inputs.fewshot] if inputs.fewshot else [])]
    done = _open_work(work, _fingerprint(config, task, settings, read_files), resume=config.resume)
    done = {e.id: done[e.id] for e in examples if e.id in done}
    todo = [e for e in examples if e.id not in done]
    timings = {"prepare": time.perf_counter() - began}
    throughput = _throughput(0, {"generate_s": 0.0, "score_s": 0.0, "new_tokens": 0, "prompt_tokens": 0})
    model_facts: dict[str, Any] = {}
    if todo:
        fresh, throughput, model_facts = _run_missing(
            config, task, settings, todo, work, done, progress, timings
        )
        done.update({r.id: r for r in fresh})
    results = [done[e.id] for e in examples]
    summary = summarise(results, spec)
    summary["throughput"] = throughput
    timings["total"] = time.perf_counter() - began
    _finalise(work, output, config, task, results, summary, throughput, timings, read_files, model_facts)
    return EvalResult(output, summary, results, throughput, resumed=len(examples) - len(todo))


def _run_missing(
    config: EvalRunConfig,
    task: Task,
    settings: GenerationSettings,
    todo: list[Example],
    work: Path,
    done: dict[str, ExampleResult],
    progress: ProgressHook | None,
    timings: dict[str, float],
) -> tuple[list[ExampleResult], dict[str, Any], dict[str, Any]]:
    """Load the model and run the examples not done yet, appending each scored chunk to the work file."""
    loaded = time.perf_counter()
    generate_fn, tokenizer, model_facts = load_generator(config)
    timings["load_model"] = time.perf_counter() - loaded
    total = len(done) + len(todo)
    correct_before = sum(r.correct for r in done.values())
    with (work / EXAMPLES_FILE).open("a", encoding="utf-8") as handle:

        def append(batch: list[ExampleResult]) -> None:
            handle.writelines(json.dumps(to_jsonable(r.to_json()), ensure_ascii=False) + "\n" for r in batch)
            handle.flush()
            os.fsync(handle.fileno())

        def report(count: int, _: int, accuracy: float) -> None:
            if progress is not None:
                finished = len(done) + count
                progress(finished, total, (correct_before + accuracy * count) / finished)

        fresh, throughput = run_examples(
            generate_fn,
            tokenizer,
            task,
            todo,
            settings,
            sandbox=config.sandbox,
            chunk_size=config.chunk_size,
            on_chunk=append,
            progress=report,
        )
    timings.update(generate=throughput["generate_s"], score=throughput["score_s"])
    return fresh, throughput, model_facts


def load_generator(config: EvalRunConfig) -> tuple[GenerateFn, PreTrainedTokenizerBase, dict[str, Any]]:
    """The tokenizer and a ``(prompts, settings) -> generations`` function for the config's backend."""
    from lorasoup.evaluation.backends import BACKENDS
    from lorasoup.models import load_tokenizer, parse_model_spec

    model_spec = parse_model_spec(config.model)
    tokenizer = load_tokenizer(model_spec, padding_side="left")
    generate_fn, facts = BACKENDS.get(config.backend)(config, model_spec, tokenizer)
    return generate_fn, tokenizer, facts


def _fingerprint(
    config: EvalRunConfig, task: Task, settings: GenerationSettings, files: list[Path]
) -> dict[str, Any]:
    """What makes per-example records comparable: change any of it and old records cannot be reused.

    Batch size, chunk size, device and limit are left out: they change speed or which examples run,
    not what one example's record says.
    """
    decoding = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "sort_by_length")}
    payload = {
        "model": config.model,
        "adapter": config.adapter,
        "backend": config.backend,
        "dtype": config.dtype,
        "task": to_jsonable(task.spec),
        "prefix_sha256": hashlib.sha256(task.prefix.encode()).hexdigest(),
        "inputs": {Path(p).name: h for p, h in inputs_fingerprint(files).items()},
        "decoding": decoding,
        "sandbox": asdict(config.sandbox),
    }
    return json.loads(json.dumps(to_jsonable(payload)))


def _open_work(work: Path, fingerprint: dict[str, Any], *, resume: bool) -> dict[str, ExampleResult]:
    """The records already in ``work`` (after checking they were made with the same settings)."""
    if work.exists() and (not resume or not read_records(work / EXAMPLES_FILE)):
        shutil.rmtree(work)  # a failed attempt that scored nothing has nothing to keep
    if not work.exists():
        work.mkdir(parents=True)
        write_json_atomic(work / FINGERPRINT_FILE, fingerprint)
        return {}
    try:
        previous = json.loads((work / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous != fingerprint:
        changed = sorted(
            k for k in fingerprint if not isinstance(previous, dict) or previous.get(k) != fingerprint[k]
        )
        listed = ", ".join(changed) or "unknown"
        raise ConfigError(
            f"{work} holds an unfinished run with other settings (changed: {listed}); "
            "pass --no-resume to start over, or rerun with the old settings"
        )
    return read_records(work / EXAMPLES_FILE)


def read_records(path: Path) -> dict[str, ExampleResult]:
    """Records of an ``examples.jsonl`` by id. A torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    records: dict[str, ExampleResult] = {}
    good_bytes = 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for number, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
            complete = raw.endswith(b"\n")
        except (UnicodeDecodeError, ValueError):
            row, complete = None, False
        if row is None or not complete:
            if number == len(lines):
                break
            raise DataError(f"{path}: line {number} is not a JSON record; delete the file to start over")
        record = ExampleResult.from_json(row, f"{path}: line {number}")
        records[record.id] = record
        good_bytes += len(raw)
    with path.open("r+b") as handle:
        handle.truncate(good_bytes)
    return records


def _finalise(
    work: Path,
    output: Path,
    config: EvalRunConfig,
    task: Task,
    results: list[ExampleResult],
    summary: dict[str, Any],
    throughput: dict[str, Any],
    timings: dict[str, float],
    files: list[Path],
    model_facts: dict[str, Any],
) -> None:
    """Write the final files into ``work`` and rename it to ``output`` (replacing it if allowed)."""
    with atomic_file(work / EXAMPLES_FILE) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(to_jsonable(r.to_json()), ensure_ascii=False) + "\n" for r in results)
    write_json_atomic(work / "summary.json", {"task": task.name, **summary})
    report = markdown_report(
        task.name, summary, model=config.model, adapter=config.adapter, throughput=throughput
    )
    (work / "summary.md").write_text(report, encoding="utf-8")
    record = run_record(
        command="eval",
        config=config,
        seed=_seed(config, task),
        timings=timings,
        task=task.spec,
        inputs=inputs_fingerprint(files),
        model=model_facts,
        accuracy=summary["accuracy"],
        examples=summary["examples"],
        scoring=scoring_record(task.spec, config.sandbox),
    )
    write_json_atomic(work / "run.json", record)
    if output.exists():
        require_free_output(output, overwrite=config.overwrite)
    replace_dir(work, output)
    (output / FINGERPRINT_FILE).unlink(missing_ok=True)  # only a resume needs it


def _seed(config: EvalRunConfig, task: Task) -> int:
    return config.generation.seed if config.generation.seed is not None else task_settings(task).seed
