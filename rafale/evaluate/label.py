"""`rafale label`: sampled outputs scored by a reward model, written as feedback that preference tuning reads.

The samples are JSON lines `{prompt, output}` (what `rafale sample` writes; several outputs of one prompt are several
lines with the same prompt). Each output is scored with the prompt before it, tokenized as the reward model was
trained (tasks/reward.py: prompt and output encoded apart, an EOS after the output), in batches. The feedback:

- pairwise: `{prompt, chosen, rejected}` per prompt, its best-scored output against its worst (paired preference
  tuning: DPO, IPO, SimPO, ORPO, a reward model). A prompt with fewer than two distinct outputs, or whose outputs all
  score the same, has no pair: it is skipped and counted.
- binary: `{prompt, completion, label}` per output, label true when its score is above the threshold (`--threshold`,
  else the median score) (KTO).

Each line also carries the scores. The file is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rafale.errors import RafaleError

FEEDBACK = ("pairwise", "binary")


@dataclass
class Labelled:
    """What `label_samples` wrote, for the command's summary."""

    outputs: int
    prompts: int
    written: int
    skipped: int = 0
    threshold: float | None = None
    desirable: int = 0
    lines: list[str] = field(default_factory=list)


def read_samples(path: Path) -> list[tuple[str, str]]:
    """(prompt, output) of every line of a samples file; a bad line is one error naming it and the field."""
    from rafale.data.formats import _jsonl_records, _string_field

    if not path.is_file():
        raise RafaleError(f"{path}: no such samples file")
    samples = [(_string_field(record, "prompt", where), _string_field(record, "output", where))
               for where, record in _jsonl_records(path)]
    if not samples:
        raise RafaleError(f"{path}: holds no samples (JSON lines with prompt and output)")
    return samples


def score_samples(model_path: Path, samples: list[tuple[str, str]], batch_size: int) -> list[float]:
    """The reward model's score of each (prompt, output)."""
    from rafale.models.generate import load_folder
    from rafale.models.weights import read_hf_config
    from rafale.tasks.reward import score_texts

    folder, model, tokenizer = load_folder(model_path, scores=True)
    if model.config.num_scores != 1:
        raise RafaleError(f"{folder}: scores {model.config.num_scores} labels; a reward model has one")
    hf = read_hf_config(folder)
    segments = [[(prompt, False), (output, True)] for prompt, output in samples]
    return score_texts(model, tokenizer, segments, hf["eos_token_id"], hf["pad_token_id"], batch_size)


def feedback_records(samples: list[tuple[str, str]], scores: list[float], feedback: str,
                     threshold: float | None) -> tuple[list[dict], Labelled]:
    """The feedback records of scored samples, and what was written and skipped."""
    by_prompt: dict[str, dict[str, float]] = {}
    for (prompt, output), score in zip(samples, scores):
        outputs = by_prompt.setdefault(prompt, {})
        outputs[output] = max(score, outputs.get(output, score))
    summary = Labelled(outputs=len(samples), prompts=len(by_prompt), written=0)
    records = []
    if feedback == "pairwise":
        for prompt, outputs in by_prompt.items():
            best, worst = max(outputs, key=outputs.get), min(outputs, key=outputs.get)
            if len(outputs) < 2 or outputs[best] == outputs[worst]:
                summary.skipped += 1
                continue
            records.append({"prompt": prompt, "chosen": best, "rejected": worst, "chosen_score": outputs[best],
                            "rejected_score": outputs[worst]})
    else:
        summary.threshold = statistics.median(scores) if threshold is None else threshold
        for (prompt, output), score in zip(samples, scores):
            desirable = score > summary.threshold
            summary.desirable += desirable
            records.append({"prompt": prompt, "completion": output, "label": desirable, "score": score})
    summary.written = len(records)
    return records, summary


def write_jsonl_atomically(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def label_samples(model_path: Path, samples_path: Path, out_path: Path, feedback: str, threshold: float | None = None,
                  batch_size: int = 32) -> Labelled:
    """Score the samples with the reward model and write the feedback (see the module's docstring)."""
    if feedback not in FEEDBACK:
        raise RafaleError(f"--feedback: {feedback!r} is not one of {', '.join(FEEDBACK)}")
    if threshold is not None and feedback != "binary":
        raise RafaleError("--threshold: only binary feedback has a threshold")
    samples = read_samples(samples_path)
    scores = score_samples(model_path, samples, batch_size)
    records, summary = feedback_records(samples, scores, feedback, threshold)
    if not records:
        raise RafaleError(f"{samples_path}: no prompt has two outputs that score differently: no pair to write")
    write_jsonl_atomically(records, out_path)
    summary.lines.append(f"scored {summary.outputs} outputs of {summary.prompts} prompts with {model_path}")
    if feedback == "pairwise":
        summary.lines.append(f"wrote {summary.written} pairs (best against worst output) to {out_path}; "
                             f"{summary.skipped} prompts skipped (fewer than 2 distinct outputs, or all tied)")
    else:
        how = "--threshold" if threshold is not None else "the median score"
        summary.lines.append(f"wrote {summary.written} examples to {out_path}: {summary.desirable} desirable (score "
                             f"above {summary.threshold:.4f}, {how}), {summary.written - summary.desirable} not")
    return summary
