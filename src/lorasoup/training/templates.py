"""Records and prompt templates: what a record is, and how it becomes a ``(prompt, response)`` pair.

A record is ``{"instruction": str, "input": str (optional, default ""), "output": str}``, or a raw-text
record ``{"text": str}`` (a paragraph of a ``.txt`` corpus); :func:`check_record` validates one.

The prompt/response split matters because the loss is masked on the prompt:
:func:`lorasoup.training.data.tokenize_example` supervises only the response tokens (unless
``train_on_inputs``). Templates live in the ``TEMPLATES`` registry so configs name them
(``template: alpaca``) and new ones are added without an if/elif ladder.

* ``alpaca`` — the Stanford Alpaca template (https://github.com/tatsu-lab/stanford_alpaca), with and
  without an input; the default, as the LoRA Soups paper uses it (https://arxiv.org/abs/2410.13025).
* ``plain`` — ``instruction [+ "\\n" + input] + "\\n"``, for base models and quick tests.
* ``chat`` — the tokenizer's own chat template with one user message and the generation prompt, for
  instruct models.

Raw-text records bypass templates: their prompt is ``""`` and the whole text is the response
(see :func:`format_example`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lorasoup.errors import DataError
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Template = Callable[[Mapping[str, Any], "PreTrainedTokenizerBase"], tuple[str, str]]
"""``(record, tokenizer) -> (prompt, response)``; the tokenizer is only read (``chat`` needs it)."""

TEMPLATES: Registry[Template] = Registry("prompt template")

_FIELDS_HINT = "every record needs string fields 'instruction' and 'output' ('input' is optional)"
_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@TEMPLATES.register("alpaca")
def alpaca(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """Stanford Alpaca prompt; the no-input variant when ``input`` is empty, as Alpaca itself does."""
    instruction, extra = record["instruction"], record.get("input") or ""
    if extra:
        prompt = ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=instruction)
    return prompt, record["output"]


@TEMPLATES.register("plain")
def plain(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """Instruction, then the input on its own line if any, then a newline; no boilerplate."""
    extra = record.get("input") or ""
    body = f"{record['instruction']}\n{extra}" if extra else record["instruction"]
    return f"{body}\n", record["output"]


@TEMPLATES.register("chat")
def chat(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The tokenizer's chat template: one user turn (instruction, blank line, input) + generation prompt.

    The rendered prompt may already contain the BOS text (e.g. ``<|begin_of_text|>``); tokenisation
    then does not add a second one.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r} has no chat template; use template='alpaca' or 'plain', "
            "or set tokenizer.chat_template"
        )
    extra = record.get("input") or ""
    content = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return str(prompt), record["output"]


def format_example(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, template: str = "alpaca"
) -> tuple[str, str]:
    """Split a record into ``(prompt, response)``: text records as ``("", text)``, others by template.

    The template name is looked up first, so an unknown name (``ConfigError`` listing the valid ones)
    is caught even when the record is raw text.
    """
    render = TEMPLATES.get(template)
    if "text" in record and "instruction" not in record:
        return "", record["text"]
    return render(record, tokenizer)


def check_record(row: object, where: str, *, allow_text: bool = False) -> dict[str, Any]:
    """Validate one record and return a new dict with ``input`` defaulted to ``""``.

    ``where`` names the file and row for the error message. ``allow_text`` accepts raw-text records
    ``{"text": str}`` (loaded from ``.txt``) as well as instruction records.
    """
    if not isinstance(row, Mapping):
        raise DataError(
            f"{where}: a record must be a JSON object with 'instruction' and 'output', "
            f"got {json_kind(row)}; {_FIELDS_HINT}"
        )
    if allow_text and "text" in row and "instruction" not in row:
        _check_string(row, "text", where)
        return dict(row)
    for field in ("instruction", "output"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}; {_FIELDS_HINT}")
        _check_string(row, field, where)
    if row.get("input") is not None:
        _check_string(row, "input", where)
    return {**row, "input": row.get("input") or ""}


def _check_string(row: Mapping[str, Any], field: str, where: str) -> None:
    value = row[field]
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise DataError(
            f"{where}: field {field!r} must be a string, got {json_kind(value)} {shown}; {_FIELDS_HINT}"
        )


def json_kind(value: object) -> str:
    """The JSON name of a value's type (``object``, ``array``, ...), for error messages."""
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
