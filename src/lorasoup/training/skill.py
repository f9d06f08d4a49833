"""Train one LoRA with transformers' ``Trainer`` and PEFT: a skill LoRA, or the DATA-MIX baseline.

DATA-MIX (LoRA Soups, https://arxiv.org/abs/2410.13025) is one LoRA trained on the mixed data of
several skills; here it is a config with several data sources. The flow:

    sources ─► load_records ─► mix_records (sizes / proportions, seeded) ─► split_eval
            ─► build_dataset per source (template, response-only labels) ─► [pack_examples]
            ─► get_peft_model(base, LoraConfig) ─► Trainer.train ─► adapter + run.json (atomic)

Why the Trainer: ``accelerate launch -m lorasoup train CONFIG`` then runs the same config under DDP or
FSDP with no code change, and its checkpoints (``OUTPUT.checkpoints/checkpoint-N``: adapter, optimizer,
scheduler, RNG states) resume exactly. Seeding: the Trainer seeds the global RNGs from ``train.seed``
when it is created (it owns the training process: dropout, data order); the LoRA ``A`` matrices are
initialised before that, from a local ``torch.Generator`` seeded with ``train.seed``, so the same seed
gives the same adapter. Only the main process writes the artifact.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from lorasoup.artifacts import (
    atomic_output_dir,
    inputs_fingerprint,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.devices import DTYPES, cuda_available
from lorasoup.errors import LorasoupError
from lorasoup.resources import StepClock, resource_record, synchronizer
from lorasoup.training.config import LoraOptions, TrainRunConfig
from lorasoup.training.data import (
    collate,
)
from lorasoup.training.skill_data import TrainingData, build_training_data

ProgressHook = Callable[[int, int, float], None]
"""``(step, total_steps, latest_logged_loss)``; called on the main process only."""


@dataclass
class TrainResult:
    """What ``train_skill`` did. ``model`` is the trained ``PeftModel`` (eval mode), for in-process use."""

    output: Path
    steps: int
    losses: list[tuple[int, float]]
    eval_loss: float | None
    train_examples: int
    eval_examples: int
    examples_per_source: dict[str, int]
    seconds: float
    resumed_from: str | None = None
    is_main_process: bool = True
    model: Any = field(default=None, repr=False)
    notices: list[str] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def lora_config(options: LoraOptions) -> Any:
    """The PEFT ``LoraConfig`` for ``options`` (causal LM task, no bias)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_rslora=options.use_rslora,
        bias="none",
    )


def seed_lora_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every ``lora_A`` as PEFT's default does, ``U(-1/√in, 1/√in)``, from a seeded generator.

    PEFT initialises A with ``kaiming_uniform_(a=√5)`` (that bound) from the global RNG and B with zeros;
    drawing A here, in sorted module order, makes the start a function of ``seed`` alone without touching
    the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name and param.requires_grad:
                bound = 1.0 / math.sqrt(param.shape[1])
                draw = torch.empty(param.shape, dtype=torch.float32).uniform_(
                    -bound, bound, generator=generator
                )
                param.copy_(draw)


class _ClockCallback(TrainerCallback):
    """Times the optimizer steps (``StepClock``) of this process, from the start of ``Trainer.train``."""

    def __init__(self) -> None:
        self.clock: StepClock | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.clock = StepClock(
            state.max_steps, first_step=state.global_step, synchronize=synchronizer(args.device)
        )
        self.clock.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.clock is not None:
            self.clock.tick(state.global_step)


class _ProgressCallback(TrainerCallback):
    """Feeds ``(step, total, loss)`` to a progress hook on the main process."""

    def __init__(self, hook: ProgressHook) -> None:
        self.hook, self.loss = hook, float("nan")

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any
    ) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            if state.is_world_process_zero:
                self.hook(state.global_step, state.max_steps, self.loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.is_world_process_zero:
            self.hook(state.global_step, state.max_steps, self.loss)


def training_arguments(config: TrainRunConfig, *, has_eval: bool, quiet: bool) -> TrainingArguments:
    """Map ``config.train`` onto ``TrainingArguments`` (no reporting integrations, safetensors always)."""
    t = config.train
    kwargs: dict[str, Any] = dict(
        output_dir=str(config.checkpoint_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        optim=t.optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.data_seed,
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps and has_eval else "no",
        eval_steps=t.eval_steps or None,
        load_best_model_at_end=t.load_best_at_end,
        metric_for_best_model="eval_loss" if t.load_best_at_end else None,
        greater_is_better=False if t.load_best_at_end else None,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=quiet,
        use_cpu=t.use_cpu or not cuda_available(),
        remove_unused_columns=False,  # the collator already returns exactly the model's inputs
    )
    if t.group_by_length:
        kwargs["train_sampling_strategy"] = "group_by_length"
    if t.compile != "none":
        kwargs["torch_compile"] = True
        kwargs["torch_compile_mode"] = None if t.compile == "default" else t.compile
    if t.tf32 is not None and not kwargs["use_cpu"]:  # transformers refuses tf32 without a CUDA GPU
        kwargs["tf32"] = t.tf32
    return TrainingArguments(**_for_installed_transformers(kwargs))


@contextlib.contextmanager
def restored_fp32_precision() -> Iterator[None]:
    """Give the process its fp32 matmul precision back after the block: ``TrainingArguments`` sets
    it process-wide (TF32 with ``train.tf32``, or with ``compile`` when ``tf32`` is null), and what
    runs after the training (scoring, merging) must not inherit it. Only the process-wide setting is
    put back: accelerate also sets the legacy ``allow_tf32`` of CUDA matmuls for a compiled run on a
    GPU, and writing the new API's per-backend value over that would make every later read of the
    legacy flag raise (torch ≥ 2.9 refuses a mix), so that one flag stays as accelerate left it."""
    backends = torch.backends
    if not hasattr(backends, "fp32_precision"):  # torch < 2.9: the legacy flags only
        yield
        return
    before = backends.fp32_precision
    try:
        yield
    finally:
        backends.fp32_precision = before


def _for_installed_transformers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Rename v5 arguments for transformers 4.x (``gradient_checkpointing*``, ``warmup_ratio``,
    ``group_by_length``)."""
    accepted = inspect.signature(TrainingArguments).parameters
    kwargs = dict(kwargs)
    if "activation_checkpointing" not in accepted:
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    if "train_sampling_strategy" in kwargs and "train_sampling_strategy" not in accepted:
        kwargs["group_by_length"] = kwargs.pop("train_sampling_strategy") == "group_by_length"
    if isinstance(kwargs["warmup_steps"], float) and "warmup_ratio" in accepted:
        kwargs["warmup_ratio"] = kwargs.pop("warmup_steps")
    return kwargs


def resolve_resume(config: TrainRunConfig) -> str | None:
    """``resume_from`` as a checkpoint directory: a path, or ``last`` for the newest in OUTPUT.checkpoints."""
    if config.resume_from is None:
        return None
    if config.resume_from == "last":
        found = get_last_checkpoint(str(config.checkpoint_dir)) if config.checkpoint_dir.is_dir() else None
        if found is None:
            raise LorasoupError(f"resume_from=last: no checkpoint-N directory in {config.checkpoint_dir}")
        return found
    path = Path(config.resume_from)
    if not (path / "trainer_state.json").is_file():
        raise LorasoupError(
            f"resume_from={path}: not a Trainer checkpoint (no trainer_state.json); pass "
            f"{config.checkpoint_dir}/checkpoint-N or 'last'"
        )
    return str(path)


def _load_lora_model(config: TrainRunConfig) -> tuple[Any, TrainingData, dict[str, Any], Any]:
    """The tokenizer, the data, the base's fingerprint, and the base wrapped as a fresh ``PeftModel``
    whose ``lora_A`` are drawn from ``train.seed`` (before the Trainer seeds the global RNGs)."""
    from peft import get_peft_model

    from lorasoup.models import load_base_model, load_tokenizer, model_fingerprint, parse_model_spec

    spec = parse_model_spec(config.base_model)
    tokenizer = load_tokenizer(spec)
    data = build_training_data(config, tokenizer)
    base = load_base_model(spec, dtype=DTYPES[config.train.dtype])
    # no KV cache in the training forwards (training.loop.language_model_loss says why); this model
    # is only trained and its loss evaluated, and the adapter saved holds no base config
    base.config.use_cache = False
    fingerprint = model_fingerprint(base)
    model = get_peft_model(base, lora_config(config.lora))
    seed_lora_init(model, config.train.seed)
    return tokenizer, data, fingerprint, model


def _train_and_evaluate(
    trainer: Trainer, resume: str | None, has_eval: bool, timings: dict[str, float]
) -> float | None:
    """Train (from ``resume`` if given), then evaluate when there is eval data; times each in ``timings``."""
    clock = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    timings["train"] = time.perf_counter() - clock
    if not has_eval:
        return None
    clock = time.perf_counter()
    eval_loss = float(trainer.evaluate()["eval_loss"])
    timings["eval"] = time.perf_counter() - clock
    return eval_loss


def _training_facts(
    trainer: Trainer,
    resume: str | None,
    losses: list[tuple[int, float]],
    eval_loss: float | None,
    step_clock: _ClockCallback,
) -> dict[str, Any]:
    """``run.json``'s ``training``: steps, batch geometry, losses, the best checkpoint, throughput."""
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "world_size": trainer.args.world_size,
        "n_gpu": trainer.args.n_gpu,  # > 1 in one process: transformers' DataParallel
        "global_batch": global_batch(trainer.args),
        "resumed_from": resume,
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "eval_loss": eval_loss,
        "losses": losses,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "throughput": step_clock.clock.rates() if step_clock.clock is not None else None,
    }


def train_skill(config: TrainRunConfig, progress: ProgressHook | None = None) -> TrainResult:
    """Train the LoRA described by ``config`` and write ``config.output`` (PEFT adapter + ``run.json``)."""
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    resume = resolve_resume(config)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer, data, fingerprint, model = _load_lora_model(config)
    timings["load"] = time.perf_counter() - clock

    checkpoints_existed = config.checkpoint_dir.exists()
    with restored_fp32_precision():
        trainer = _build_trainer(config, model, data, tokenizer.pad_token_id, progress)
        step_clock = _ClockCallback()
        trainer.add_callback(step_clock)
        eval_loss = _train_and_evaluate(trainer, resume, data.eval is not None, timings)
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    resources = resource_record(trainer.args.device)  # before the adapter is gathered; every process
    main = trainer.is_world_process_zero()
    if main and not checkpoints_existed:
        _remove_if_empty(config.checkpoint_dir)  # the Trainer makes it even when it saves nothing

    training = _training_facts(trainer, resume, losses, eval_loss, step_clock)
    record = functools.partial(_run_json, config, model, data, fingerprint, training, timings, resources)
    _save_artifact(trainer, output, overwrite=config.overwrite, record=record, timings=timings)
    model.eval()
    return TrainResult(
        output=output,
        steps=trainer.state.global_step,
        losses=losses,
        eval_loss=eval_loss,
        train_examples=len(data.train),
        eval_examples=len(data.eval) if data.eval is not None else 0,
        examples_per_source={name: entry.train_examples for name, entry in data.sources.items()},
        seconds=sum(timings.values()),
        resumed_from=resume,
        is_main_process=main,
        model=trainer.model,
        notices=data_parallel_notice(trainer.args),
    )


def global_batch(args: TrainingArguments) -> int:
    """Rows per optimizer step over every GPU and process (per-device batch × GPUs × accumulation)."""
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


def data_parallel_notice(args: TrainingArguments) -> list[str]:
    """One process that sees several GPUs trains with ``nn.DataParallel`` (transformers' default): the
    batch per step grows with the GPU count, which is easy to miss; say so."""
    if args.n_gpu <= 1:
        return []
    return [
        f"{args.n_gpu} GPUs visible to one process: transformers used DataParallel, so each step took "
        f"{global_batch(args)} rows (train.batch_size × {args.n_gpu}); for one GPU set "
        "CUDA_VISIBLE_DEVICES=0, for several use accelerate launch (DDP, configs/accelerate/)"
    ]


def _build_trainer(
    config: TrainRunConfig, model: Any, data: TrainingData, pad_token_id: int, progress: ProgressHook | None
) -> Trainer:
    args = training_arguments(config, has_eval=data.eval is not None, quiet=progress is not None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=functools.partial(collate, pad_token_id=pad_token_id),
        callbacks=[_ProgressCallback(progress)] if progress is not None else [],
    )
    if progress is not None:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict, over the progress bar
    return trainer


def _run_json(
    config: TrainRunConfig,
    model: Any,
    data: TrainingData,
    fingerprint: dict[str, Any],
    training: dict[str, Any],
    timings: dict[str, float],
    resources: dict[str, Any],
) -> dict[str, Any]:
    """``run.json``: config, versions, seed, timings, data counts per source, losses, GPU memory."""
    return run_record(
        command="train",
        config=config,
        seed=config.train.seed,
        timings=timings,
        base_model=fingerprint,
        lora={
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "target_modules": sorted(model.peft_config["default"].target_modules),
        },
        data={
            "sources": data.sources,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval) if data.eval is not None else 0,
            "dropped_examples": data.train.dropped,
            "packing": config.data.packing,
        },
        training=training,
        resources=resources,
        inputs_sha256=inputs_fingerprint([Path(source.path) for source in config.data.sources]),
    )


def _save_artifact(
    trainer: Trainer,
    output: Path,
    *,
    overwrite: bool,
    record: Callable[[], dict[str, Any]],
    timings: dict[str, float],
) -> None:
    """Write the adapter and ``run.json`` atomically from the main process; every process joins the gather."""
    accelerator = trainer.accelerator
    start = time.perf_counter()
    state_dict = gathered_state_dict(accelerator, trainer.model)
    if trainer.is_world_process_zero():
        peft_model = accelerator.unwrap_model(trainer.model)
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            write_adapter(peft_model.peft_config["default"], adapter_weights(state_dict), staging)
            timings["save"] = time.perf_counter() - start
            write_json_atomic(staging / "run.json", record())
    accelerator.wait_for_everyone()


def gathered_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the adapter is read from, whole, on the main process; every process must call this.

    Under FSDP2 only the trainable parameters (the LoRA factors) are gathered: gathering the frozen base
    too, as ``accelerator.get_state_dict`` does, would copy all of a 7B model (13 GB) to the CPU to keep
    a few megabytes. Otherwise ``accelerator.get_state_dict``: a collective under FSDP1 and DeepSpeed
    ZeRO-3, a plain ``state_dict()`` under DDP or on one device.
    """
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)
    return accelerator.get_state_dict(model)


def adapter_weights(state_dict: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's LoRA factors from a full model state dict, under the names PEFT saves them with.

    The parameter ``...q_proj.lora_A.<adapter>.weight`` is saved as ``...q_proj.lora_A.weight``. Keys are
    selected by name rather than by walking the model (as ``peft.get_peft_model_state_dict`` does), so a
    state dict gathered from an FSDP-wrapped model, whose module names carry wrapper prefixes, works too.
    """
    weights = {}
    for key, value in state_dict.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter}."
            if marker in key:
                weights[key.replace(marker, f".{part}.")] = value.detach().to("cpu").contiguous()
    if not weights:
        raise LorasoupError(
            f"the trained model holds no LoRA weights for adapter {adapter!r}; nothing to save"
        )
    return weights


def write_adapter(config: Any, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a PEFT adapter: ``adapter_config.json`` (``LoraConfig.save_pretrained``, the base by its
    canonical name) + safetensors."""
    from safetensors.torch import save_file

    from lorasoup.models import canonical_model_name

    saved = copy.deepcopy(config)
    saved.inference_mode = True  # as PeftModel.save_pretrained records it
    saved.base_model_name_or_path = canonical_model_name(saved.base_model_name_or_path)
    saved.save_pretrained(str(directory))
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (checkpoints were written) or already gone
        directory.rmdir()
