"""Supervised fine-tuning records -> text segments `(text, trainable)`: the loss falls on the trainable ones only.

A later step tokenizes each segment on its own and concatenates the ids, so the boundary between a prompt and its
response is exact. Three record formats, picked by `FormatSettings.format` ("auto": by the first record's keys):

- **alpaca**: `{instruction, input, output}`; `input` may be missing, null or "". The prompt is a named template
  of `PROMPT_TEMPLATES` with `{instruction}` and `{input}` filled in one pass (plain replacement of those two
  markers, never `str.format`, so braces and markers inside the user's text stay as they are). Each template is a
  pair: the variant for a record with an input, and the one for a record without.
  - "alpaca": the Stanford Alpaca wording, "Below is an instruction that describes a task ... ### Instruction:
    ... ### Input: ... ### Response:\\n" (the no-input variant drops the Input section and the words about it).
  - "plain": the instruction, then the input, each on its own line ("{instruction}\\n{input}\\n"; without an
    input, "{instruction}\\n").
  Segments: `[(prompt, False), (output, True)]`.
- **input_output** (dolomite-engine's convention): `{input, output}`. The prompt is `input_format` with its one
  `__input__` replaced by the input, the response `output_format` with its one `__output__` replaced by the output.
  Any space between prompt and response belongs to `output_format` (e.g. `" __output__"`), so that it is trained.
- **chat**: `{messages: [{role, content}, ...]}`, roles system / user / assistant, rendered with a Jinja chat
  template the way transformers' `apply_chat_template` renders it. The loss falls on the assistant turns only: the
  text an assistant turn adds is the rendering up to and including it minus the rendering of the messages before it
  with the generation prompt. So the template must render turn by turn (each rendering a prefix of the next);
  one that does not is an error, never silently mis-masked.

The built-in "chatml" template renders each message as `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`, with the
tokenizer's EOS right after an assistant message's `<|im_end|>` (left out when the EOS is `<|im_end|>` itself),
and a generation prompt `<|im_start|>assistant\\n`. An assistant turn's trainable text is therefore
`CONTENT<|im_end|>EOS\\n`: the role header is prompt, and the newline after EOS is trained too (generation stops
at the EOS, so that newline is never produced; training on it is harmless and keeps the rule one line long).
Exporting the same template with the tokenizer makes transformers render exactly what was trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from rafale.errors import RafaleError


class FormatError(RafaleError):
    """An SFT record, file or format setting that rafale cannot turn into segments."""


FORMATS = ("auto", "alpaca", "input_output", "chat")
ROLES = ("system", "user", "assistant")

PROMPT_TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}

# The newlines sit after `}}` tags: trim_blocks would swallow a newline that follows a `{% ... %}` tag.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
        "{{ eos_token if message['role'] == 'assistant' and eos_token != '<|im_end|>' else '' }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

_ALPACA_MARKERS = re.compile(r"\{(instruction|input)\}")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class FormatSettings:
    format: str = "auto"  # one of FORMATS; "auto" picks by the first record's keys
    prompt_template: str = "alpaca"  # alpaca only: a key of PROMPT_TEMPLATES
    input_format: str = "__input__"  # input_output only: holds "__input__" exactly once
    output_format: str = "__output__"  # input_output only: holds "__output__" exactly once
    chat_template: str = "chatml"  # chat only: a key of CHAT_TEMPLATES, or Jinja source (from a tokenizer folder)
    eos_token: str = ""  # the tokenizer's EOS text, given to chat templates as `eos_token`
    bos_token: str = ""


def check_settings(settings: FormatSettings, where: str) -> None:
    """Refuse settings that cannot work, before any record is read. `where` names the settings' place
    (e.g. "run.yaml: data.config"); each message is `{where}.{field}: problem`, on one line.

    Only the fields the chosen format uses are checked ("auto": all of them)."""
    if settings.format not in FORMATS:
        raise FormatError(f"{where}.format: unknown format {settings.format!r}; choose one of {', '.join(FORMATS)}")
    used = FORMATS[1:] if settings.format == "auto" else (settings.format,)
    if "alpaca" in used and settings.prompt_template not in PROMPT_TEMPLATES:
        raise FormatError(
            f"{where}.prompt_template: unknown prompt template {settings.prompt_template!r}; "
            f"choose one of {', '.join(PROMPT_TEMPLATES)}"
        )
    if "input_output" in used:
        for field, placeholder in (("input_format", "__input__"), ("output_format", "__output__")):
            count = getattr(settings, field).count(placeholder)
            if count != 1:
                raise FormatError(f"{where}.{field}: must contain {placeholder} exactly once (found {count})")
    if "chat" in used:
        template = settings.chat_template
        # Text with no Jinja tag would render the same constant for every conversation: surely a mistyped name.
        if template not in CHAT_TEMPLATES and "{{" not in template and "{%" not in template:
            raise FormatError(
                f"{where}.chat_template: unknown chat template {template!r}; "
                f"name one of {', '.join(CHAT_TEMPLATES)} or give the Jinja source"
            )
        from jinja2 import TemplateError

        try:
            _compiled(_chat_template_source(settings))
        except TemplateError as error:
            raise FormatError(f"{where}.chat_template: not a valid Jinja template: {_one_line(error)}") from None


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """The records of one .jsonl or .json file, each with where it is: ("file.jsonl:LINE", record), 1-based and
    counting blank lines (which are skipped), or ("file.json: record N", record) for a JSON array, 1-based.

    A UTF-8 byte order mark at the start is allowed; any other byte that is not UTF-8 is an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".json":
        records = _json_array_records(path)
    else:
        raise FormatError(f"{path}: SFT records must be in a .jsonl or .json file")
    found = False
    for where, record in records:
        found = True
        yield where, record
    if not found:
        raise FormatError(f"{path}: the file holds no records")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                bad = raw[error.start]
                raise FormatError(f"{where}: not UTF-8 (byte 0x{bad:02x} at column {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FormatError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise FormatError(f"{where}: not a JSON object (found {_json_type(record)})")
            yield where, record


def _json_array_records(path: Path) -> Iterator[tuple[str, dict]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise FormatError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x})") from None
    if not text.strip():
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(records, list):
        raise FormatError(f"{path}: a .json file of records must be an array of objects, not {_json_type(records)}")
    for number, record in enumerate(records, start=1):
        where = f"{path}: record {number}"
        if not isinstance(record, dict):
            raise FormatError(f"{where}: not a JSON object (found {_json_type(record)})")
        yield where, record


def detect_format(record: dict, where: str) -> str:
    """The format a record's keys say: chat (messages), alpaca (instruction, output), input_output (input, output)."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "input" in record and "output" in record and "instruction" not in record:
        return "input_output"
    keys = ", ".join(sorted(record)) or "none"
    raise FormatError(
        f"{where}: cannot tell the record's format from its keys (found: {keys}); alpaca needs instruction and "
        "output (input optional), input_output needs input and output, chat needs messages"
    )


def to_segments(record: dict, where: str, settings: FormatSettings, fmt: str) -> list[tuple[str, bool]]:
    """The record as `(text, trainable)` segments, for `fmt` alpaca, input_output or chat (auto already resolved).
    No segment is empty and no two neighbours share their trainability."""
    if fmt == "chat":
        return _chat_segments(_checked_messages(record, where), where, settings)
    prompt, response = _prompt_and_response(record, where, settings, fmt)
    return _merged([(prompt, False), (response, True)])


def prompt_segments(record: dict, where: str, settings: FormatSettings, fmt: str) -> str:
    """The prompt a model is given at inference for this record: everything before the final response (for chat, the
    messages before the last assistant turn, rendered with the generation prompt). See `reference_response`."""
    if fmt == "chat":
        messages = _checked_messages(record, where)
        return _render(messages[: _last_assistant(messages)], settings, True, where)
    return _prompt_and_response(record, where, settings, fmt)[0]


def reference_response(record: dict, where: str, settings: FormatSettings, fmt: str) -> str:
    """The expected answer: the output field as it is (alpaca, input_output), or the last assistant turn's content."""
    if fmt == "chat":
        messages = _checked_messages(record, where)
        return messages[_last_assistant(messages)]["content"]
    _prompt_and_response(record, where, settings, fmt)  # the record passes the same checks as for training
    return record["output"]


def render_chat(
    messages: list[dict], template: str, add_generation_prompt: bool, eos_token: str = "", bos_token: str = ""
) -> str:
    """Render `messages` with a Jinja chat template as transformers' `apply_chat_template` does (sandboxed,
    trim_blocks, lstrip_blocks, `raise_exception`, a JSON `tojson`). No `strftime_now`: a rendering that depends on
    today's date would change the tokens from one day to the next."""
    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token, bos_token=bos_token
        )
    except Exception as error:  # whatever a template raises is the template's (or the record's) problem
        raise FormatError(f"the chat template failed to render: {_one_line(error)}") from None


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once: a chat record renders it several times, and every record uses the same one."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON, as transformers gives them.
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


def _prompt_and_response(record: dict, where: str, settings: FormatSettings, fmt: str) -> tuple[str, str]:
    if fmt == "alpaca":
        instruction = _string_field(record, "instruction", where)
        input_text = record.get("input")
        if input_text is not None and not isinstance(input_text, str):
            raise FormatError(f"{where}: field input: must be a string, got {_json_type(input_text)}")
        with_input, without_input = PROMPT_TEMPLATES[settings.prompt_template]
        values = {"instruction": instruction, "input": input_text or ""}
        # One pass over the template: an instruction that contains "{input}" keeps it as it is.
        prompt = _ALPACA_MARKERS.sub(lambda match: values[match[1]], with_input if input_text else without_input)
        return prompt, _string_field(record, "output", where)
    if fmt == "input_output":
        prompt = settings.input_format.replace("__input__", _string_field(record, "input", where), 1)
        response = settings.output_format.replace("__output__", _string_field(record, "output", where), 1)
        return prompt, response
    raise ValueError(f"not a resolved SFT format: {fmt!r}")


def _chat_segments(messages: list[dict], where: str, settings: FormatSettings) -> list[tuple[str, bool]]:
    segments = []
    covered, covered_count = "", 0  # the rendering of the first `covered_count` messages, all of it in `segments`
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(messages[:index], settings, True, where)
        _check_grows(covered, covered_count, prompt, where)
        turn = _render(messages[: index + 1], settings, False, where)
        _check_grows(prompt, index, turn, where)
        segments += [(prompt[len(covered) :], False), (turn[len(prompt) :], True)]
        covered, covered_count = turn, index + 1
    full = _render(messages, settings, False, where)
    _check_grows(covered, covered_count, full, where)
    segments.append((full[len(covered) :], False))
    return _merged(segments)


def _check_grows(shorter: str, count: int, longer: str, where: str) -> None:
    if not longer.startswith(shorter):
        raise FormatError(
            f"{where}: the chat template does not render turn by turn (the rendering of the first {count} messages "
            "is not a prefix of the next); rafale needs a template whose output grows message by message"
        )


def _render(messages: list[dict], settings: FormatSettings, add_generation_prompt: bool, where: str) -> str:
    template = _chat_template_source(settings)
    try:
        return render_chat(messages, template, add_generation_prompt, settings.eos_token, settings.bos_token)
    except FormatError as error:
        raise FormatError(f"{where}: {error}") from None


def _chat_template_source(settings: FormatSettings) -> str:
    return CHAT_TEMPLATES.get(settings.chat_template, settings.chat_template)


def _checked_messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        found = "it is missing" if "messages" not in record else f"got {_json_type(messages)}"
        raise FormatError(f"{where}: field messages: must be an array of {{role, content}} messages; {found}")
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise FormatError(
                f"{where}: field {name}: must be an object with role and content, got {_json_type(message)}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise FormatError(f"{where}: field {name}.{key}: missing")
        if message["role"] not in ROLES:
            raise FormatError(f"{where}: field {name}.role: {message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise FormatError(f"{where}: field {name}.content: must be a string, got {_json_type(message['content'])}")
    if not any(message["role"] == "assistant" for message in messages):
        raise FormatError(f"{where}: field messages: no assistant turn, so nothing to train on")
    return messages


def _last_assistant(messages: list[dict]) -> int:
    return max(index for index, message in enumerate(messages) if message["role"] == "assistant")


def _string_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise FormatError(f"{where}: field {name}: missing")
    value = record[name]
    if not isinstance(value, str):
        raise FormatError(f"{where}: field {name}: must be a string, got {_json_type(value)}")
    return value


def _merged(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Empty segments dropped, neighbours of the same trainability joined."""
    merged: list[tuple[str, bool]] = []
    for text, trainable in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trainable:
            merged[-1] = (merged[-1][0] + text, trainable)
        else:
            merged.append((text, trainable))
    return merged


def _json_type(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value}"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
