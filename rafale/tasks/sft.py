"""Supervised fine-tuning: a decoder learns to answer, trained on the responses only.

Records (data/formats.py) become text segments, prompts and responses; each segment is tokenized on its own and
the ids concatenated, so the boundary is exactly where the record puts it, and a prompt encoded alone at inference
gives the ids it had in training. Labels are the ids of the response tokens and IGNORE_INDEX elsewhere (prompts,
chat scaffolding, padding); every response ends with the tokenizer's EOS. A row longer than `max_sequence_length`
is cut (`overflow: truncate`) or dropped (`drop`); a row that loses its whole response is dropped; both are
counted in the data summary. The loss, metrics and the causality check are the causal LM's (next-token
cross-entropy, here over the response tokens). At the end the run prints a few held-out answers and the
exact-match score on the held-out split ("test" where the source has one, else "validation"), and the export
carries a chat template that renders what the model was trained on.

Sources: a .jsonl/.json file, a folder of them (train/validation/test files or subfolders are those splits), a
save_to_disk folder or hub dataset of records, or "synthetic:instructions" (data/instructions.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Literal, Optional

from pydantic import Field, PositiveInt

from rafale.config import SYNTHETIC_PREFIX, DataSettings, RunFile
from rafale.data.formats import FormatSettings, check_settings
from rafale.errors import RafaleError
from rafale.tasks.base import HeldOutText, Prepared, Say
from rafale.tasks.causal_lm import CausalLM

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData

SYNTHETIC_INSTRUCTIONS = SYNTHETIC_PREFIX + "instructions"
# Columns of the loaded records and of the prepared rows.
RECORD, WHERE, FORMAT, TEXT = "record", "where", "format", "text"
LABELS, PROMPT, REFERENCE = "labels", "prompt", "reference"
HELD_OUT_SPLITS = ("test", "validation")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


class SFTSettings(DataSettings):
    """`data.config` of the SFT task (data/formats.py describes the formats and templates)."""

    # "auto" (by the first record's keys), "alpaca", "input_output" or "chat".
    format: Literal["auto", "alpaca", "input_output", "chat"] = "auto"
    # alpaca: "alpaca" (Stanford Alpaca's wording) or "plain" (the instruction and the input, a line each).
    prompt_template: str = "alpaca"
    # input_output: the prompt around __input__ and the response around __output__.
    input_format: str = "__input__"
    output_format: str = "__output__"
    # chat: "chatml", "tokenizer" (the chat_template of the tokenizer folder's tokenizer_config.json), or Jinja.
    chat_template: str = "chatml"
    # A row longer than max_sequence_length: "truncate" cuts it, "drop" leaves it out.
    overflow: Literal["truncate", "drop"] = "truncate"
    # "documents": the training records packed whole into rows of max_sequence_length (data/packing.py), attention
    # kept inside each; "none": a record a row, padded. Held-out splits stay a record a row.
    packing: Literal["none", "documents"] = "none"
    # documents: best-fit decreasing packs this many records at a time: the build's memory follows it, not the data.
    packing_window_documents: PositiveInt = 8192
    # Held-out records whose greedy answers are scored (exact match) at the end of a run; 0: none.
    eval_examples: Annotated[int, Field(ge=0)] = 200
    # Held-out answers printed at the end of a run.
    sample_count: Annotated[int, Field(ge=0)] = 3
    # Batches pad to their longest row: instruction rows differ widely in length.
    pad_inputs: bool = False


class SupervisedFineTuning(CausalLM):
    Settings = SFTSettings
    cache_settings = ("format", "prompt_template", "input_format", "output_format", "overflow", "packing")

    def check_settings(self, settings: SFTSettings, where: str) -> None:
        from rafale.data.sources import check_source

        check_source(settings, synthetic_corpora=(SYNTHETIC_INSTRUCTIONS[len(SYNTHETIC_PREFIX):],))
        check_settings(self.format_settings(settings, where), where)

    def cache_key(self, settings: SFTSettings) -> dict[str, Any]:
        # The template's text, not its name: a tokenizer folder's template may change under the same name.
        return {**super().cache_key(settings), "chat_template": self.format_settings(settings).chat_template}

    def format_settings(self, settings: SFTSettings, where: str = "data.config", tokenizer: Tokenizer = None,
                        eos_id: int = 0) -> FormatSettings:
        """The record-format settings, with the chat template's source and, given the tokenizer, its EOS and BOS."""
        eos = bos = ""
        if tokenizer is not None:
            eos = tokenizer.id_to_token(eos_id)
            bos = next((token for token in BOS_TOKENS if tokenizer.token_to_id(token) is not None), "")
        return FormatSettings(format=settings.format, prompt_template=settings.prompt_template,
                              input_format=settings.input_format, output_format=settings.output_format,
                              chat_template=self._chat_template(settings, where), eos_token=eos, bos_token=bos)

    def _chat_template(self, settings: SFTSettings, where: str) -> str:
        if settings.chat_template != "tokenizer":
            return settings.chat_template
        if settings.tokenizer_path is None:
            raise RafaleError(f"{where}.chat_template: 'tokenizer' reads the tokenizer folder's chat template, but "
                              f"data.config.tokenizer_path is not set")
        folder = Path(settings.tokenizer_path)
        folder = folder if folder.is_dir() else folder.parent
        jinja, config_file = folder / "chat_template.jinja", folder / "tokenizer_config.json"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = None
        if config_file.is_file():
            try:
                template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
                raise RafaleError(f"{where}.chat_template: {config_file}: not valid JSON ({error})") from None
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise RafaleError(f"{where}.chat_template: 'tokenizer', but {folder} has no chat template (no "
                              f"chat_template.jinja, and no chat_template in tokenizer_config.json)")
        return template

    # --- records ------------------------------------------------------------------------------------------------
    def load_documents(self, settings: SFTSettings, work: Path) -> DatasetDict:
        """The records of every split, checked one by one (a bad one is an error naming where it is), with the
        text a tokenizer trained on the fly learns from; written to `work` as they are read."""
        import datasets

        from rafale.data import formats
        from rafale.data.rows import RowWriter
        from rafale.data.sources import shuffled, with_validation

        format_settings = self.format_settings(settings)
        fmt = settings.format
        features = datasets.Features({name: datasets.Value("string") for name in (RECORD, WHERE, FORMAT, TEXT)})
        splits = {}
        for split, records in self._records(settings, work).items():
            with RowWriter(work / f"{split}-records.arrow", features) as writer:
                for where, record in records:
                    if fmt == "auto":
                        fmt = formats.detect_format(record, where)
                    segments = formats.to_segments(record, where, format_settings, fmt)
                    if not any(trainable for _, trainable in segments):
                        raise formats.FormatError(f"{where}: the response is empty")
                    writer.append({RECORD: json.dumps(record, ensure_ascii=False), WHERE: where, FORMAT: fmt,
                                   TEXT: "".join(text for text, _ in segments)})
                dataset = writer.finish()
            if settings.shuffle_dataset:
                dataset = shuffled(dataset, settings, work, split)
            splits[split] = dataset
        if "train" not in splits:
            raise RafaleError(f"data.config.dataset_path: {settings.dataset_path} has no train split")
        return with_validation(splits, settings, "record")

    def _records(self, settings: SFTSettings, work: Path) -> dict[str, Any]:
        """(where, record) pairs by split, lazily."""
        from rafale.data import formats
        from rafale.data.sources import SPLITS, is_local, is_saved_dataset, load_raw, local_files

        path = settings.dataset_path
        if path == SYNTHETIC_INSTRUCTIONS:
            from rafale.data.instructions import generate_instructions

            records = generate_instructions(settings.synthetic_documents, settings.synthetic_seed)
            alpaca = ("instruction", "input", "output")
            return {"train": [(f"{path} record {i + 1}", {key: record[key] for key in alpaca})
                              for i, record in enumerate(records)]}
        folder = Path(path)
        if is_local(path) and not (folder.is_dir() and is_saved_dataset(folder)):
            by_split = local_files(path, SPLITS)
            for files in by_split.values():
                unsupported = [file for file in files if file.suffix.lower() not in (".json", ".jsonl")]
                if unsupported:
                    raise RafaleError(f"data.config.dataset_path: {unsupported[0]}: SFT records are .jsonl or .json")
            return {split: (pair for file in files for pair in formats.read_records(file))
                    for split, files in by_split.items()}
        raw = load_raw(settings, work)
        return {split: ((f"{path} ({split}) row {i + 1}", dict(row)) for i, row in enumerate(raw[split]))
                for split in raw if split in SPLITS}

    def tokenizer_text_column(self, settings: SFTSettings) -> str:
        return TEXT

    # --- rows ---------------------------------------------------------------------------------------------------
    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: SFTSettings,
                work: Path) -> Prepared:
        from rafale.data import formats

        format_settings = self.format_settings(settings, tokenizer=tokenizer, eos_id=eos_id)
        # The format every record was checked in: the setting's, or the one "auto" found in the first record.
        fmt = documents["train"][0][FORMAT]
        splits, summary = {}, {}
        for split, records in documents.items():
            held_out = split == next(name for name in HELD_OUT_SPLITS if name in documents)
            splits[split], summary[split] = self._rows(records, split, held_out, tokenizer, eos_id, settings,
                                                       format_settings, fmt, work)
        template = format_settings.chat_template if fmt == "chat" else prompt_as_chat_template(format_settings, fmt)
        meta = {"format": fmt, "chat_template": formats.CHAT_TEMPLATES.get(template, template)}
        if settings.packing == "documents":
            meta["packing"] = {"mode": "documents", "row_length": settings.max_sequence_length}
        return splits, summary, meta

    def _rows(self, records: Dataset, split: str, held_out: bool, tokenizer: Tokenizer, eos_id: int,
              settings: SFTSettings, format_settings: FormatSettings, fmt: str, work: Path) -> tuple[Dataset, dict]:
        """One split's rows and counts, tokenized a shard of records at a time and written as they are made (the
        training split packed `packing_window_documents` records at a time, where `packing`)."""
        import datasets

        from rafale.data import formats
        from rafale.data.packing import DOCUMENT_IDS, packed_windows
        from rafale.data.progress import BuildProgress
        from rafale.data.rows import RowWriter
        from rafale.models.loss import IGNORE_INDEX

        length, key = settings.max_sequence_length, settings.input_id_key
        counts = {"documents": len(records), "tokens": 0, "blocks": 0, "response tokens": 0, "truncated": 0,
                  "dropped": 0}
        progress = BuildProgress(f"tokenizing {split}", len(records))

        def kept() -> Iterator[dict[str, Any]]:
            size = settings.build_shard_documents
            for start in range(0, len(records), size):
                shard, tokens = records[start:start + size], 0
                for text, where in zip(shard[RECORD], shard[WHERE]):
                    record = json.loads(text)
                    ids, labels = tokenized(formats.to_segments(record, where, format_settings, fmt), tokenizer,
                                            eos_id)
                    tokens += len(ids)
                    if len(ids) > length:
                        if settings.overflow == "drop":
                            counts["dropped"] += 1
                            continue
                        ids, labels = ids[:length], labels[:length]
                        # The first label predicts nothing (position 0 has no context): a row needs one after it.
                        if all(label == IGNORE_INDEX for label in labels[1:]):
                            counts["dropped"] += 1
                            continue
                        counts["truncated"] += 1
                    counts["tokens"] += len(ids)
                    counts["response tokens"] += sum(label != IGNORE_INDEX for label in labels)
                    row = {key: ids, LABELS: labels}
                    if held_out:  # its prompt and reference answer, for the end-of-run scoring
                        row[PROMPT] = formats.prompt_segments(record, where, format_settings, fmt)
                        row[REFERENCE] = formats.reference_response(record, where, format_settings, fmt)
                    yield row
                progress.update(len(shard[RECORD]), tokens)

        features = {key: datasets.Sequence(datasets.Value("int32")), LABELS: datasets.Sequence(datasets.Value("int32"))}
        packed = settings.packing == "documents" and split == "train"
        if packed:
            features[DOCUMENT_IDS] = datasets.Sequence(datasets.Value("int32"))
        if held_out:
            features.update({PROMPT: datasets.Value("string"), REFERENCE: datasets.Value("string")})
        with RowWriter(work / f"{split}-rows.arrow", datasets.Features(features)) as writer:
            if packed:
                documents = ((row[key], row[LABELS]) for row in kept())
                for row in packed_windows(documents, length, settings.packing_window_documents):
                    writer.append({key: row["input_ids"], LABELS: row["labels"], DOCUMENT_IDS: row[DOCUMENT_IDS]})
            else:
                for row in kept():
                    writer.append(row)
            rows = writer.finish()
        progress.close()
        if len(rows) == 0:
            raise RafaleError(f"data.config.max_sequence_length: every {split} row is longer than {length} "
                              f"tokens and lost its response; raise max_sequence_length")
        counts["blocks"] = len(rows)
        return rows, counts

    def collator(self, prepared: PreparedData, settings: SFTSettings, seed: int):
        from rafale.data.collate import PaddingCollator

        return PaddingCollator(prepared.pad_token_id, settings.max_sequence_length, settings.pad_inputs,
                               settings.input_id_key, label_key=LABELS)

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        return [f"  format     {prepared.meta.get('format', '?')}", *super().summary_lines(prepared)]

    # --- the end of a run, the export ---------------------------------------------------------------------------
    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """A few held-out answers, and the exact-match score of greedy answers on the held-out split."""
        settings = config.data.config
        split = next((name for name in HELD_OUT_SPLITS if name in prepared.splits), None)
        if split is None or PROMPT not in prepared.splits[split].column_names:
            return
        held_out = prepared.splits[split]
        count = min(len(held_out), max(settings.eval_examples, settings.sample_count))
        if count == 0:
            return
        prompts, references = held_out[PROMPT][:count], held_out[REFERENCE][:count]
        answers = greedy_answers(model, prepared, prompts, config.run.sample_max_new_tokens or 48)
        say(f"held-out answers ({split}):")
        for prompt, answer, reference in list(zip(prompts, answers, references))[: settings.sample_count]:
            mark = "right" if answer.strip() == reference.strip() else "wrong"
            say(f"  {_one_line(prompt)[-100:]} -> {answer.strip()!r} ({mark}; expected {reference.strip()!r})")
        scored = min(count, settings.eval_examples)
        if scored:
            right = sum(a.strip() == r.strip() for a, r in zip(answers[:scored], references[:scored]))
            say(f"held-out exact match: {right / scored:.4f} ({right} of {scored} {split} records)")

    def held_out_text(self, config: RunFile, prepared: PreparedData, max_bytes: int) -> Optional[HeldOutText]:
        """The held-out split's reference answers, each given its prompt as generation sees it (encoded whole)."""
        split = next((name for name in HELD_OUT_SPLITS if name in prepared.splits), None)
        if split is None or PROMPT not in prepared.splits[split].column_names:
            return None
        prompts, answers, size = [], [], 0
        for prompt, answer in self.right_answers(prepared.splits[split]):
            if not answer.strip():  # nothing to score
                continue
            size += len(prompt.encode("utf-8")) + len(answer.encode("utf-8"))
            if answers and size > max_bytes:
                break
            prompts.append(prompt)
            answers.append(answer)
        return HeldOutText(f"the {split} split's answers given their prompts", answers, contexts=prompts)

    def right_answers(self, held_out) -> list[tuple[str, str]]:
        """(prompt, right response) of the held-out rows that have one."""
        return [(prompt, reference) for prompt, reference in zip(held_out[PROMPT], held_out[REFERENCE]) if reference]

    def export_tokenizer_config(self, prepared: PreparedData, config: RunFile) -> dict[str, Any]:
        template = prepared.meta.get("chat_template")
        return {"chat_template": template} if template else {}


def tokenized(segments: list[tuple[str, bool]], tokenizer: Tokenizer, eos_id: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a record's segments, each encoded on its own. A trainable segment without the EOS
    gets one after it, so that every response ends with it (chatml writes it itself)."""
    from rafale.models.loss import IGNORE_INDEX

    ids: list[int] = []
    labels: list[int] = []
    encodings = tokenizer.encode_batch_fast([text for text, _ in segments], add_special_tokens=False)
    for (_, trainable), encoding in zip(segments, encodings):
        segment = list(encoding.ids)
        if trainable and eos_id not in segment:
            segment.append(eos_id)
        ids.extend(segment)
        labels.extend(segment if trainable else [IGNORE_INDEX] * len(segment))
    return ids, labels


def prompt_as_chat_template(settings: FormatSettings, fmt: str) -> str:
    """A Jinja chat template that renders a conversation as the alpaca or input_output record it stands for: the
    user's message as the instruction (or input), the assistant's as the response, then the EOS. So an exported
    model's tokenizer_config.json renders, with transformers' apply_chat_template and `rafale generate --chat`,
    what the model was trained on."""
    from rafale.data.formats import PROMPT_TEMPLATES

    if fmt == "alpaca":
        before, after = PROMPT_TEMPLATES[settings.prompt_template][1].split("{instruction}")
        response_before, response_after = "", ""
    else:
        before, after = settings.input_format.split("__input__")
        response_before, response_after = settings.output_format.split("__output__")
    text = json.dumps
    return ("{% for message in messages %}"
            "{% if message['role'] == 'user' %}" + "{{ " + text(before) + " }}{{ message['content'] }}{{ "
            + text(after) + " }}"
            "{% elif message['role'] == 'assistant' %}" + "{{ " + text(response_before)
            + " }}{{ message['content'] }}{{ " + text(response_after) + " }}{{ eos_token }}"
            "{% endif %}{% endfor %}")


def greedy_answers(model: torch.nn.Module, prepared: PreparedData, prompts: list[str], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy answers to the prompts, up to its EOS, in batches."""
    from rafale.models.generate import generate_text

    answers = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        results = generate_text(model, prepared.tokenizer, prompts[start:start + batch_size],
                                max_new_tokens=max_new_tokens, eos_token_id=prepared.eos_token_id,
                                pad_token_id=prepared.pad_token_id, add_special_tokens=False)
        answers.extend(result["text"] for result in results)
    return answers


def _one_line(text: str) -> str:
    return " ".join(text.split())
