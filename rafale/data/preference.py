"""Preference records -> a prompt and its responses as SFT segments, so that they render and tokenize as SFT's do.

Paired feedback (DPO, IPO, SimPO, ORPO, a reward model): a record holds one prompt and two responses, `chosen` and
`rejected`, both strings. The prompt is given in one of three ways, told apart by the record's keys:

- `{prompt, chosen, rejected}`: `prompt` a string (rendered with `input_format`, each response with
  `output_format`, as SFT's input_output records) or a list of chat messages (rendered with the chat template, each
  response as the assistant turn that follows them, as SFT's chat records).
- `{instruction, input, chosen, rejected}`: an Alpaca record whose output is each response in turn (`input`
  optional), with SFT's named prompt templates.
- `{chosen, rejected}` only: Anthropic HH-style transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ..."). The turns the
  two share, whole, are the prompt, up to and including the "\\n\\nAssistant:" that opens the first turn where
  they differ; the rest of each transcript is its response. Used as they are (no template).

Binary feedback (KTO): `{prompt, completion, label}` with `label` true (desirable) or false, the prompt a string or
chat messages as above (or Alpaca's `instruction` and `input`).

Every problem is one line naming the file and line (or record) and the field.
"""

from __future__ import annotations

import re
from dataclasses import replace

from rafale.data.formats import FormatError, FormatSettings, _json_type, _string_field, to_segments

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN_START = re.compile(r"(?=\n\n(?:Human|Assistant):)")


def paired_kind(record: dict, where: str) -> str:
    """"prompt", "alpaca" or "transcript": how a paired record gives its prompt (see the module's docstring)."""
    for field in ("chosen", "rejected"):
        if field not in record:
            raise FormatError(f"{where}: field {field}: missing (a preference pair needs chosen and rejected)")
    if "prompt" in record:
        return "prompt"
    if "instruction" in record:
        return "alpaca"
    return "transcript"


def paired_segments(record: dict, where: str, settings: FormatSettings,
                    kind: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """The (chosen, rejected) SFT segments of a paired record; the prompt segments are the same in both."""
    if kind == "transcript":
        prompt, chosen, rejected = split_transcripts(_string_field(record, "chosen", where),
                                                     _string_field(record, "rejected", where), where)
        plain = replace(settings, input_format="__input__", output_format="__output__")
        return (to_segments({"input": prompt, "output": chosen}, where, plain, "input_output"),
                to_segments({"input": prompt, "output": rejected}, where, plain, "input_output"))
    chosen, rejected = (_string_field(record, field, where) for field in ("chosen", "rejected"))
    return prompt_and_response(record, chosen, where, settings), prompt_and_response(record, rejected, where, settings)


def binary_example(record: dict, where: str, settings: FormatSettings) -> tuple[list[tuple[str, bool]], bool]:
    """(SFT segments of the prompt and its completion, whether the completion is desirable) of a KTO record."""
    for field in ("prompt" if "instruction" not in record else "instruction", "completion", "label"):
        if field not in record:
            raise FormatError(f"{where}: field {field}: missing (a binary feedback record needs prompt (or "
                              f"instruction), completion and label)")
    label = record["label"]
    if not isinstance(label, bool):
        raise FormatError(f"{where}: field label: must be true or false, got {_json_type(label)}")
    return prompt_and_response(record, _string_field(record, "completion", where), where, settings), label


def prompt_and_response(record: dict, response: str, where: str, settings: FormatSettings) -> list[tuple[str, bool]]:
    """A record's prompt (`prompt`, a string or chat messages; or Alpaca's `instruction` and `input`) and a
    response as SFT segments."""
    if "prompt" not in record:
        alpaca = {"instruction": record.get("instruction"), "input": record.get("input"), "output": response}
        return to_segments(alpaca, where, settings, "alpaca")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return to_segments({"input": prompt, "output": response}, where, settings, "input_output")
    if isinstance(prompt, list):
        messages = [*prompt, {"role": "assistant", "content": response}]
        return to_segments({"messages": messages}, where, settings, "chat")
    raise FormatError(f"{where}: field prompt: must be a string or a list of chat messages, got {_json_type(prompt)}")


def split_transcripts(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH-style transcripts: the prompt is their longest common
    prefix of whole turns, with the "\\n\\nAssistant:" that opens the first turn where they differ."""
    chosen_turns, rejected_turns = turns(chosen), turns(rejected)
    shared = 0
    while (shared < min(len(chosen_turns), len(rejected_turns)) - 1
           and chosen_turns[shared] == rejected_turns[shared]):
        shared += 1
    prompt = "".join(chosen_turns[:shared])
    if not prompt:
        raise FormatError(f"{where}: fields chosen and rejected: the transcripts share no whole turn, so there is "
                          f"no prompt (HH-style transcripts start with \"\\n\\nHuman: ...\")")
    chosen_rest, rejected_rest = chosen[len(prompt):], rejected[len(prompt):]
    if chosen_rest.startswith(ASSISTANT) and rejected_rest.startswith(ASSISTANT):
        prompt += ASSISTANT
        chosen_rest, rejected_rest = chosen_rest[len(ASSISTANT):], rejected_rest[len(ASSISTANT):]
    return prompt, chosen_rest, rejected_rest


def turns(transcript: str) -> list[str]:
    """A transcript cut before each "\\n\\nHuman:" and "\\n\\nAssistant:" (text before the first is a turn too)."""
    return [part for part in _TURN_START.split(transcript) if part]
