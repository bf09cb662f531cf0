"""`rafale sample`: completions of a file of prompts, one `{prompt, output}` JSON line each, for evaluation or for a
new round of preference data (`rafale label` reads these lines).

Prompts come from a text file (one a line) or from .jsonl/.json records: `{prompt}` (a string, or chat messages),
`{messages}` (chat; a final assistant turn is a reference and left out) or the instruction records SFT reads
(alpaca `{instruction, input}`, `{input}`; their `output` is left out). A model that carries a chat template (an
SFT export) gets each string prompt as a user turn and each conversation rendered with it, ending in the generation
prompt, as in training; `raw` continues string prompts as plain text instead. Alpaca and input records are
rendered as SFT renders their prompts. Each line keeps the prompt as it was given (a string, or the messages), so
that the lines feed preference tuning.

Batched (left-padded, with the KV cache), greedy or sampled. Batches are the samples [k * B, (k + 1) * B), each
seeded from the seed and k, so the same prompts, seed and batch size B give the same file, also when a run is
resumed after a whole batch. Resumable: the lines already in OUT are kept and their samples skipped (a
half-written last line is dropped first); each batch is appended and flushed whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rafale.data.formats import FormatError, FormatSettings, detect_format, prompt_segments, read_records, render_chat
from rafale.errors import RafaleError


def read_prompts(path: Path) -> list[tuple[str, str | list]]:
    """(where, prompt) of each prompt of a .txt file (non-empty lines) or of .jsonl/.json records; a prompt is a
    string, a list of chat messages, or an instruction record's rendered prompt (a string)."""
    if not path.is_file():
        raise RafaleError(f"{path}: no such prompts file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [(f"{path}:{number}", line) for number, line in enumerate(lines, start=1) if line.strip()]
        if not prompts:
            raise RafaleError(f"{path}: no prompts (one a line)")
        return prompts
    prompts = []
    for where, record in read_records(path):
        if "prompt" in record:
            prompt = record["prompt"]
            if not isinstance(prompt, (str, list)):
                raise FormatError(f"{where}: field prompt: must be a string or a list of chat messages")
            prompts.append((where, _without_reference(prompt, where) if isinstance(prompt, list) else prompt))
        elif "messages" in record:
            prompts.append((where, _without_reference(record["messages"], where)))
        else:
            # An instruction record: its prompt as SFT renders it (the output, if any, is a reference).
            fmt = detect_format({**record, "output": ""}, where)
            prompts.append((where, prompt_segments({**record, "output": ""}, where, FormatSettings(), fmt)))
    return prompts


def _without_reference(messages: list, where: str) -> list[dict]:
    """Chat messages up to the model's turn: a final assistant message is the reference answer, left out."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
                               for m in messages):
        raise FormatError(f"{where}: chat messages must be a non-empty list of {{role, content}} objects")
    return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages


def model_text(prompt: str | list[dict], chat: FormatSettings | None, raw: bool, where: str) -> str:
    """The text the model continues: a conversation (or, for a chat model, a string as a user turn) rendered with
    the generation prompt; otherwise the string itself."""
    if isinstance(prompt, str) and (chat is None or raw):
        return prompt
    if chat is None:
        raise RafaleError(f"{where}: chat messages need a model with a chat template (an SFT export carries one)")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return render_chat(messages, chat.chat_template, True, chat.eos_token, chat.bos_token)
    except FormatError as error:
        raise FormatError(f"{where}: {error}") from None


def kept_lines(out: Path, jobs: list[tuple[str | list, int]], samples: int) -> int:
    """How many samples OUT already holds, after dropping a half-written last line; each must be the sample it
    stands for (the same prompt and sample index in the same order), so that another file is never appended to."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(out, "r+b") as file:
            file.truncate(len(whole))
    lines = whole.decode("utf-8").splitlines()
    if len(lines) > len(jobs):
        raise RafaleError(f"{out}: holds {len(lines)} lines, more than the {len(jobs)} samples asked for; "
                          f"is it another run's file?")
    for number, (line, (prompt, index)) in enumerate(zip(lines, jobs), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RafaleError(f"{out}:{number}: not a JSON line; is it another file?") from None
        if record.get("prompt") != prompt or (samples > 1 and record.get("sample_index") != index):
            raise RafaleError(f"{out}:{number}: holds a sample of another prompt than sample {number} of these "
                              f"prompts; write to a new file, or delete this one to start again")
    return len(lines)


def batch_seed(seed: int, block: int) -> int:
    """The seed of batch number `block`: the same wherever a run starts."""
    import numpy as np

    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_file(model_path: str | Path, prompts_path: str | Path, out: str | Path, num_samples: int = 1,
                batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, raw: bool = False, progress: bool = True) -> int:
    """Write the samples of `prompts_path` to `out` (see the module's docstring); returns how many were written
    by this call."""
    from rafale.models.generate import chat_settings, generate_text, load_folder

    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise RafaleError("--num-samples, --batch-size and --max-new-tokens must be at least 1")
    if num_samples > 1 and temperature == 0:
        raise RafaleError("--num-samples: greedy decoding gives the same output each time; give --temperature > 0")
    prompts_path, out = Path(prompts_path), Path(out)
    prompts = read_prompts(prompts_path)
    jobs = [(prompt, index) for _, prompt in prompts for index in range(num_samples)]
    done = kept_lines(out, jobs, num_samples)
    if done == len(jobs):
        return 0
    folder, model, tokenizer = load_folder(model_path)
    chat = chat_settings(folder)
    texts = [model_text(prompt, chat, raw, where) for where, prompt in prompts for _ in range(num_samples)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as file:
        first = done
        while first < len(jobs):
            block = first // batch_size
            # Batches end where an uninterrupted run's end, so a resumed run continues with the same batches.
            last = min((block + 1) * batch_size, len(jobs))
            # A rendered chat writes its special tokens itself; plain text is encoded as training encoded it.
            results = generate_text(model, tokenizer, texts[first:last], max_new_tokens, temperature, top_k, top_p,
                                    batch_seed(seed, block), add_special_tokens=False)
            for (prompt, index), result in zip(jobs[first:last], results):
                line = {"prompt": prompt, "output": result["text"]}
                if num_samples > 1:
                    line["sample_index"] = index
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
            file.flush()
            if progress:
                print(f"\rsampling: {last}/{len(jobs)}", end="\n" if last == len(jobs) else "", file=sys.stderr,
                      flush=True)
            first = last
    return len(jobs) - done

