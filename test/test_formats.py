"""SFT record formats: alpaca, {input, output} and chat records -> (text, trainable) segments, and the files."""

import json
import re
import subprocess
import sys

import pytest

from rafale.data.formats import (
    CHAT_TEMPLATES,
    FORMATS,
    PROMPT_TEMPLATES,
    FormatError,
    FormatSettings,
    check_settings,
    detect_format,
    prompt_segments,
    read_records,
    reference_response,
    render_chat,
    to_segments,
)
from rafale.errors import RafaleError

EOS = "<|endoftext|>"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# A Llama-3-like template, written for these tests: a BOS, a header per message, <|eot_id|> after each.
LLAMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Starts with the number of messages, so a longer conversation's rendering does not extend a shorter one's.
COUNTING = "{{ messages | length }}:{% for message in messages %}{{ message['content'] }};{% endfor %}"


def trainable_text(segments):
    return "".join(text for text, trainable in segments if trainable)


def joined(segments):
    return "".join(text for text, _ in segments)


def test_import_is_cheap():
    code = "import sys, rafale.data.formats; print(sorted({'torch', 'datasets', 'jinja2'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_format_error_is_a_user_mistake():
    assert issubclass(FormatError, RafaleError) and FormatError.exit_code == 2
    assert FORMATS == ("auto", "alpaca", "input_output", "chat")


# --- alpaca -----------------------------------------------------------------------------------------------------


def test_alpaca_with_input():
    record = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    segments = to_segments(record, "a.jsonl:1", FormatSettings(), "alpaca")
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n"
    )
    assert segments == [(prompt, False), ("chat", True)]
    assert prompt_segments(record, "a.jsonl:1", FormatSettings(), "alpaca") == prompt
    assert reference_response(record, "a.jsonl:1", FormatSettings(), "alpaca") == "chat"


@pytest.mark.parametrize(
    "record",
    [{"instruction": "Say hi."}, {"instruction": "Say hi.", "input": ""}, {"instruction": "Say hi.", "input": None}],
)
def test_alpaca_without_input(record):
    record = {**record, "output": "Hi!"}
    segments = to_segments(record, "a.jsonl:1", FormatSettings(), "alpaca")
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert segments == [(prompt, False), ("Hi!", True)]
    assert joined(segments) == prompt + "Hi!"


def test_alpaca_plain_template_and_braces_in_user_text():
    settings = FormatSettings(prompt_template="plain")
    record = {"instruction": "Echo {input} and {}", "input": "{instruction}", "output": "ok"}
    assert to_segments(record, "w", settings, "alpaca") == [
        ("Echo {input} and {}\n{instruction}\n", False),
        ("ok", True),
    ]
    no_input = {"instruction": "Go", "output": "went"}
    assert to_segments(no_input, "w", settings, "alpaca") == [("Go\n", False), ("went", True)]
    assert set(PROMPT_TEMPLATES) >= {"alpaca", "plain"}


# --- input_output -------------------------------------------------------------------------------------------------


def test_input_output_defaults():
    record = {"input": "2+2=", "output": "4"}
    assert to_segments(record, "w", FormatSettings(), "input_output") == [("2+2=", False), ("4", True)]


def test_input_output_custom_formats():
    settings = FormatSettings(input_format="Question: __input__\n", output_format="Answer: __output__")
    record = {"input": "what is __input__ or __output__?", "output": "__output__ stays"}
    segments = to_segments(record, "w", settings, "input_output")
    assert segments == [
        ("Question: what is __input__ or __output__?\n", False),
        ("Answer: __output__ stays", True),
    ]
    assert prompt_segments(record, "w", settings, "input_output") == "Question: what is __input__ or __output__?\n"
    assert reference_response(record, "w", settings, "input_output") == "__output__ stays"


def test_input_output_space_belongs_to_the_response():
    settings = FormatSettings(output_format=" __output__")
    assert to_segments({"input": "Q", "output": "A"}, "w", settings, "input_output") == [("Q", False), (" A", True)]


# --- chat -------------------------------------------------------------------------------------------------------


def test_chatml_multi_turn():
    settings = FormatSettings(eos_token=EOS)
    record = {"messages": CHAT}
    segments = to_segments(record, "c.jsonl:1", settings, "chat")
    full = render_chat(CHAT, CHAT_TEMPLATES["chatml"], False, eos_token=EOS)
    assert full == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        f"<|im_start|>assistant\nHello!<|im_end|>{EOS}\n<|im_start|>user\n2+2?<|im_end|>\n"
        f"<|im_start|>assistant\n4<|im_end|>{EOS}\n"
    )
    assert joined(segments) == full
    assert [trainable for _, trainable in segments] == [False, True, False, True]
    assert [text for text, trainable in segments if trainable] == [f"Hello!<|im_end|>{EOS}\n", f"4<|im_end|>{EOS}\n"]
    prompt = prompt_segments(record, "c.jsonl:1", settings, "chat")
    assert prompt == full[: full.rindex("<|im_start|>assistant\n")] + "<|im_start|>assistant\n"
    assert prompt + trainable_text(segments[-1:]) == full
    assert reference_response(record, "c.jsonl:1", settings, "chat") == "4"


def test_chatml_eos_that_is_im_end_is_not_doubled():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    rendered = render_chat(messages, CHAT_TEMPLATES["chatml"], False, eos_token="<|im_end|>")
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_chat_trailing_user_turn_is_not_trained():
    settings = FormatSettings(eos_token=EOS)
    record = {"messages": CHAT[1:3] + [{"role": "user", "content": "Thanks"}]}
    segments = to_segments(record, "w", settings, "chat")
    assert [trainable for _, trainable in segments] == [False, True, False]
    assert segments[-1] == ("<|im_start|>user\nThanks<|im_end|>\n", False)
    assert prompt_segments(record, "w", settings, "chat") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_custom_template():
    settings = FormatSettings(chat_template=LLAMA_LIKE, bos_token="<|begin_of_text|>")
    check_settings(settings, "run.yaml: data.config")
    segments = to_segments({"messages": CHAT}, "w", settings, "chat")
    assert joined(segments) == render_chat(CHAT, LLAMA_LIKE, False, bos_token="<|begin_of_text|>")
    assert segments[0][0].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    assert [text for text, trainable in segments if trainable] == ["Hello!<|eot_id|>", "4<|eot_id|>"]
    prompt = prompt_segments({"messages": CHAT}, "w", settings, "chat")
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_that_does_not_grow_turn_by_turn():
    settings = FormatSettings(chat_template=COUNTING)
    with pytest.raises(FormatError, match=r"^c\.jsonl:4: the chat template does not render turn by turn .*first 2 "):
        to_segments({"messages": CHAT}, "c.jsonl:4", settings, "chat")


def test_chat_template_with_a_syntax_error():
    settings = FormatSettings(format="chat", chat_template="{% for message in messages %}{{ message['content'] }}")
    with pytest.raises(FormatError, match=r"^run\.yaml: data\.config\.chat_template: not a valid Jinja template"):
        check_settings(settings, "run.yaml: data.config")


def test_chat_template_name_that_is_unknown():
    with pytest.raises(FormatError, match=r"chat_template: unknown chat template 'chatmk'.*chatml"):
        check_settings(FormatSettings(chat_template="chatmk"), "run.yaml: data.config")


def test_chat_template_that_raises():
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
        "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    )
    settings = FormatSettings(chat_template=template)
    check_settings(settings, "w")
    with pytest.raises(FormatError, match=r"^c\.jsonl:2: the chat template failed to render: a system message must"):
        to_segments({"messages": CHAT[1:]}, "c.jsonl:2", settings, "chat")
    with pytest.raises(FormatError, match="a system message must come first"):
        render_chat(CHAT[1:], template, False)


def test_render_chat_tojson_and_loop_controls():
    # As in transformers: tojson gives plain JSON (no HTML escapes), and {% break %} is allowed.
    template = "{% for message in messages %}{{ message['content'] | tojson }}{% break %}{% endfor %}"
    assert render_chat([{"role": "user", "content": "café <b>"}] * 2, template, False) == '"café <b>"'


def test_transformers_renders_what_is_trained():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", EOS, "<|begin_of_text|>", "Hi", "Hello", "!", "4"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    for template, bos in ((CHAT_TEMPLATES["chatml"], None), (LLAMA_LIKE, "<|begin_of_text|>")):
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token=EOS, bos_token=bos, chat_template=template
        )
        settings = FormatSettings(chat_template=template, eos_token=tokenizer.eos_token, bos_token=bos or "")
        for add_generation_prompt in (False, True):
            theirs = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert theirs == render_chat(CHAT, template, add_generation_prompt, EOS, bos or "")
        assert tokenizer.apply_chat_template(CHAT, tokenize=False) == joined(
            to_segments({"messages": CHAT}, "w", settings, "chat")
        )
        inference = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
        assert inference == prompt_segments({"messages": CHAT}, "w", settings, "chat")


# --- detecting the format ---------------------------------------------------------------------------------------


def test_detect_format():
    assert detect_format({"messages": []}, "w") == "chat"
    assert detect_format({"instruction": "a", "input": "b", "output": "c"}, "w") == "alpaca"
    assert detect_format({"instruction": "a", "output": "c"}, "w") == "alpaca"
    assert detect_format({"input": "b", "output": "c"}, "w") == "input_output"
    with pytest.raises(FormatError, match=r"^d\.jsonl:1: .*found: prompt, response.*chat needs messages"):
        detect_format({"prompt": "a", "response": "b"}, "d.jsonl:1")


# --- reading files ----------------------------------------------------------------------------------------------


def test_jsonl_records_keep_their_line_numbers(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n   \n{"input": "c", "output": "d"}\n', encoding="utf-8")
    records = list(read_records(path))
    assert records == [(f"{path}:1", {"input": "a", "output": "b"}), (f"{path}:4", {"input": "c", "output": "d"})]


def test_jsonl_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"input": "a", "output": "b"}\n')
    assert [record for _, record in read_records(path)] == [{"input": "a", "output": "b"}]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": 1}\n{"a": 2}\n{"a": \n', r":3: invalid JSON \(Expecting value"),
        (b'{"a": 1}\n[1, 2]\n', r":2: not a JSON object \(found an array\)"),
        (b'{"a": 1}\n"text"\n', r":2: not a JSON object \(found a string\)"),
        (b"", r": the file holds no records"),
        (b"\n\n", r": the file holds no records"),
        (b'{"a": 1}\n{"a": "caf\xe9"}\n', r":2: not UTF-8 \(byte 0xe9"),
    ],
)
def test_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(FormatError) as caught:
        list(read_records(path))
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text
    assert re.search(message, text), text


def test_json_array_records(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"input": "a", "output": "b"}, {"messages": []}]), encoding="utf-8")
    assert list(read_records(path)) == [
        (f"{path}: record 1", {"input": "a", "output": "b"}),
        (f"{path}: record 2", {"messages": []}),
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"input": "a", "output": "b"}', "must be an array of objects, not an object"),
        (b'[{"a": 1}, 3]', "record 2: not a JSON object (found the number 3)"),
        (b"[]", "the file holds no records"),
        (b"", "the file holds no records"),
        (b'[\n{"a": 1},\n{"a" 2}\n]', ":3: invalid JSON"),
        (b'[\n{"a": "\xff"}\n]', ":2: not UTF-8 (byte 0xff)"),
    ],
)
def test_json_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(FormatError) as caught:
        list(read_records(path))
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_other_file_kinds_are_refused(tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text("input,output\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"\.jsonl or \.json"):
        list(read_records(path))


# --- record errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, record, message",
    [
        ("alpaca", {"instruction": "a"}, "field output: missing"),
        ("alpaca", {"output": "a"}, "field instruction: missing"),
        ("alpaca", {"instruction": "a", "output": 3}, "field output: must be a string, got the number 3"),
        ("alpaca", {"instruction": "a", "output": None}, "field output: must be a string, got null"),
        ("alpaca", {"instruction": "a", "input": ["x"], "output": "b"}, "field input: must be a string, got an array"),
        ("input_output", {"input": "a", "output": True}, "field output: must be a string, got a boolean"),
        ("input_output", {"output": "a"}, "field input: missing"),
        ("chat", {"messages": "hi"}, "field messages: must be an array of {role, content} messages; got a string"),
        ("chat", {"conversation": []}, "field messages: must be an array of {role, content} messages; it is missing"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "field messages: no assistant turn"),
        ("chat", {"messages": []}, "field messages: no assistant turn"),
        ("chat", {"messages": ["hi"]}, "field messages[0]: must be an object with role and content, got a string"),
        ("chat", {"messages": [{"content": "hi"}]}, "field messages[0].role: missing"),
        ("chat", {"messages": [{"role": "user"}]}, "field messages[0].content: missing"),
        ("chat", {"messages": [{"role": "bot", "content": "hi"}]}, "field messages[0].role: 'bot' is not one of"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
            "field messages[1].content: must be a string, got null",
        ),
    ],
)
def test_record_errors(fmt, record, message):
    for function in (to_segments, prompt_segments, reference_response):
        with pytest.raises(FormatError) as caught:
            function(record, "sft.jsonl:7", FormatSettings(), fmt)
        assert str(caught.value).startswith(f"sft.jsonl:7: {message}")


# --- settings ---------------------------------------------------------------------------------------------------


def test_default_settings_are_valid():
    for fmt in FORMATS:
        check_settings(FormatSettings(format=fmt), "run.yaml: data.config")


@pytest.mark.parametrize(
    "settings, message",
    [
        (FormatSettings(input_format="Question: "), "input_format: must contain __input__ exactly once (found 0)"),
        (
            FormatSettings(format="input_output", output_format="__output__ __output__"),
            "output_format: must contain __output__ exactly once (found 2)",
        ),
        (FormatSettings(prompt_template="vicuna"), "prompt_template: unknown prompt template 'vicuna'"),
        (FormatSettings(format="sharegpt"), "format: unknown format 'sharegpt'"),
    ],
)
def test_settings_errors(settings, message):
    with pytest.raises(FormatError) as caught:
        check_settings(settings, "run.yaml: data.config")
    assert str(caught.value).startswith(f"run.yaml: data.config.{message}")


def test_settings_of_an_unused_format_are_not_checked():
    check_settings(FormatSettings(format="chat", input_format="no placeholder"), "run.yaml: data.config")
