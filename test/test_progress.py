"""A picture of every run: metrics.jsonl across a crash and a resumption, the console's progress line on a terminal
and in a log, the end-of-run perplexity of the held-out text, metrics.png and `rafale plot`.

One tiny run, in this process: it crashes in batch 6, before its checkpoint, with lines up to batch 5 written and
its latest checkpoint at batch 4 (a torn line is then appended, as a kill in the middle of a write leaves it), and
is run again, resuming from batch 4; the tests read what the two left behind.
"""

import io
import json
import re
import signal
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

RUN = {
    "run": {"name": "pictured", "seed": 7, "max_duration": "6ba", "max_lr": 3e-3, "warmup_pct": 0.1,
            "eval_interval": "4ba", "save_interval": "2ba", "sample_max_new_tokens": 0},
    "model": {"config": "pythia-tiny"},
    "data": {"pipeline": "causal_lm",
             "config": {"name": "pictured", "dataset_path": "synthetic:stories", "synthetic_documents": 200,
                        "vocab_size": 320, "max_sequence_length": 64, "train_batch_size": 8, "eval_batch_size": 16,
                        "validation_fraction": 0.03}},
    # A log's line every 1000 s: within this short run, only the first and the last batch's.
    "logging": {"log_seconds": 1000},
}
CRASH_AT = 6


class Crash(Exception):
    pass


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, the crashed run's output as a log gets it, the resumed run's output as a terminal gets it)."""
    from composer import Callback

    from rafale import callbacks, train
    from rafale.config import load_run_file

    folder = tmp_path_factory.mktemp("pictures")
    run_file = folder / "run.yaml"
    run_file.write_text(yaml.safe_dump(RUN))

    class CrashBeforeTheCheckpoint(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == CRASH_AT:
                raise Crash()

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    log, terminal = io.StringIO(), Terminal()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        standard = train._callbacks
        patch.setattr(train, "_callbacks", lambda: [*standard(), CrashBeforeTheCheckpoint()])
        with redirect_stdout(log), pytest.raises(Crash):
            train.train_run(load_run_file(run_file))
        for number, handler in handlers.items():  # the crashed run never closed its Trainer
            signal.signal(number, handler)
        run_folder = folder / "cache" / "checkpoints" / "pictured"
        # Batch 5's line was written after the checkpoint at 4: the resumed run must cut it off and write it again.
        assert [row["batch"] for row in rows_of(run_folder)] == [0, 1, 2, 3, 4, 5]
        with open(run_folder / "metrics.jsonl", "a") as history:
            history.write('{"batch": 6, "train/lo')
        patch.setattr(train, "_callbacks", standard)
        patch.setattr(callbacks, "LIVE_SECONDS", 0.0)
        with redirect_stdout(terminal):
            train.train_run(load_run_file(run_file))
    return run_folder, log.getvalue(), terminal.getvalue()


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_metrics_history_reads_as_one_run_after_a_crash_and_a_resumption(run):
    folder, _, _ = run
    rows = rows_of(folder)
    assert [row["batch"] for row in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert all(later["tokens"] > earlier["tokens"] for earlier, later in zip(rows[1:], rows[2:]))
    # Batch 4 evaluates at its end; batch 6, the last, when the run ends (Composer evaluates at FIT_END when the
    # interval does not divide the run), after its line was written: the evaluation joins that line.
    assert [row["batch"] for row in rows if "eval/cross-entropy" in row] == [0, 4, 6]
    for row in rows[1:]:
        assert row["train/loss"] > 0 and row["lr"] >= 0 and row["epoch"] == 0
        assert set(row) <= {"batch", "epoch", "tokens", "samples", "seconds", "train/loss", "lr", "tokens_per_sec",
                            "eval/cross-entropy", "eval/perplexity", "text/token_perplexity", "text/bits_per_byte",
                            "text/byte_perplexity", "text/word_perplexity"}
    assert rows[-1]["eval/perplexity"] == pytest.approx(2.718281828 ** rows[-1]["eval/cross-entropy"], rel=1e-4)


def test_a_log_gets_few_plain_lines_and_a_terminal_one_rewritten_line(run):
    _, log, terminal = run
    assert "\r" not in log and "\x1b" not in log
    # log_seconds 1000: the first batch's line, then only evaluations (the run crashed before its last batch).
    assert re.findall(r"^\[(batch \d+/6|eval at batch \d+)\]", log, flags=re.M) == [
        "eval at batch 0", "batch 1/6", "eval at batch 4"]
    assert re.search(r"^\[batch 1/6\] loss \d+\.\d{4}  lr \S+  \d+:\d\d elapsed, \d+:\d\d left$", log, flags=re.M)

    assert "resumed from the latest checkpoint" in terminal and "at batch 4" in terminal
    live = re.findall(r"\r\[batch (\d)/6\] [^\r\n]*", terminal)
    assert [int(batch) for batch in live] == [5, 6]  # batch 5 rewritten in place, the last one's line stays
    assert re.search(r"\r\[batch 5/6\] loss \S+  lr \S+  \d+:\d\d elapsed, \d+:\d\d left\x1b\[K\r", terminal)
    # The eval line replaces the live line and ends with a newline; nothing else is left on a rewritten line.
    assert re.search(r"\[batch 6/6\][^\r\n]*\x1b\[K\n\[eval at batch 6\] cross-entropy", terminal)
    assert "\n\n" not in terminal


def test_the_end_of_a_run_scores_its_validation_text_as_rafale_eval_does(run, tmp_path):
    from rafale.config import load_run_file
    from rafale.data import prepare_data
    from rafale.evaluate.perplexity import evaluate_folder
    from rafale.train import HELD_OUT_BYTES

    folder, _, terminal = run
    last = rows_of(folder)[-1]
    printed = re.search(r"held-out text, the validation split's text \((\d+) documents, ([\d,]+) bytes, [\d,]+ "
                        r"tokens; window 64\): token perplexity (\S+), bits per byte (\S+), byte perplexity (\S+)",
                        terminal)
    assert printed, terminal
    assert float(printed[4].rstrip(",")) == pytest.approx(last["text/bits_per_byte"], abs=1e-4)

    run_file = folder.parents[2] / "run.yaml"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder.parents[1]))
        config = load_run_file(run_file)
        held_out = config.task.held_out_text(config, prepare_data(config), HELD_OUT_BYTES)
    assert len(held_out.documents) == int(printed[1])
    texts = tmp_path / "validation.jsonl"
    texts.write_text("".join(json.dumps({"text": document}) + "\n" for document in held_out.documents))
    result, _ = evaluate_folder(folder, str(texts), window=64)
    assert result.bytes == int(printed[2].replace(",", ""))
    for name in ("token_perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert last[f"text/{name}"] == pytest.approx(getattr(result, name), rel=1e-5)


def test_a_context_is_scored_as_context_only(run):
    from rafale.evaluate.perplexity import evaluate_perplexity
    from rafale.models.generate import load_folder

    folder, _, _ = run
    _, model, tokenizer = load_folder(folder)
    prompts, answers = ["One day, a little", "The cat"], [" girl went to the park.", " sat on a mat."]
    result = evaluate_perplexity(model, tokenizer, answers, None, None, window=64, contexts=prompts)
    expected, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            context = tokenizer.encode(prompt, add_special_tokens=False).ids
            answer_ids = tokenizer.encode(answer, add_special_tokens=False).ids
            log_probs = model(torch.tensor([context + answer_ids])).log_softmax(-1)[0]
            expected += sum(float(log_probs[len(context) - 1 + i, token]) for i, token in enumerate(answer_ids))
            tokens += len(answer_ids)
    assert result.tokens == tokens
    assert result.log_likelihood == pytest.approx(expected, rel=1e-5)
    assert result.bytes == sum(len(answer.encode()) for answer in answers)


def test_the_run_draws_its_curves_and_rafale_plot_overlays_runs(run, tmp_path):
    from typer.testing import CliRunner

    from rafale.cli import app

    folder, _, terminal = run
    png = folder / "metrics.png"
    assert f"curves drawn to {png}" in terminal
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "both.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder.parents[1]))
        # A run name (under the cache), a run folder and a metrics.jsonl path.
        result = CliRunner().invoke(app, ["plot", "pictured", str(folder), str(folder / "metrics.jsonl"), "-o",
                                          str(out), "--metric", "loss", "--metric", "eval/perplexity", "--x", "tokens"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"curves of 3 runs drawn to {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rafale_plot_errors_are_one_line(run, tmp_path):
    from rafale.errors import RafaleError
    from rafale.plot import plot_command

    folder, _, _ = run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder.parents[1]))
        with pytest.raises(RafaleError, match=r"^nope: no metrics.jsonl here: not a metrics file, a run's folder or "
                                              r"a run name; runs in .*/checkpoints: pictured$"):
            plot_command(["pictured", "nope"], tmp_path / "x.png", [], "batch")
        with pytest.raises(RafaleError, match=r"^--metric: no run has 'eval/accuracy'; columns: loss, eval/"):
            plot_command(["pictured"], tmp_path / "x.png", ["eval/accuracy"], "batch")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_a_run_says_how_to_get_its_picture(run, tmp_path, monkeypatch):
    from rafale import plot

    folder, _, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "metrics.jsonl").write_bytes((folder / "metrics.jsonl").read_bytes())
    monkeypatch.setattr(plot, "_pyplot", lambda: None)
    assert plot.draw_run(copy, "copy") == 'no metrics.png: plots need matplotlib; pip install "rafale[plot]"'
    assert not (copy / "metrics.png").exists()


def test_a_history_is_cut_back_to_the_checkpoint_it_resumes_from(tmp_path):
    from rafale.callbacks import truncate_history

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"batch": batch}) + "\n" for batch in range(5)) + '{"batch": 5, "lo')
    truncate_history(path, 3)
    assert path.read_text() == "".join(json.dumps({"batch": batch}) + "\n" for batch in range(4))
    before = path.stat().st_mtime_ns
    truncate_history(path, 3)
    assert path.stat().st_mtime_ns == before  # a clean history up to the batch is left as it is


def test_sft_scores_its_held_out_answers_given_their_prompts(tmp_path, monkeypatch):
    from test_sft import merging_tokenizer, run_file, write_jsonl

    from rafale.config import load_run_file
    from rafale.data import prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    records = [{"input": f"the cat {i}", "output": f" sat xab {i}"} for i in range(8)]
    data = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), "format": "input_output",
            "tokenizer_path": str(merging_tokenizer(tmp_path)), "shuffle_dataset": False, "validation_fraction": 0.5}
    config = load_run_file(run_file(tmp_path, "answers", data))
    prepared = prepare_data(config)
    held_out = config.task.held_out_text(config, prepared, max_bytes=1000)
    assert held_out.what == "the validation split's answers given their prompts"
    assert held_out.contexts == [f"the cat {i}" for i in range(4, 8)]
    assert held_out.documents == [f" sat xab {i}" for i in range(4, 8)]
    assert held_out.prefix is None
    # The cap counts prompts and answers; the first record is kept whatever its size.
    assert len(config.task.held_out_text(config, prepared, max_bytes=40).documents) == 2
    assert len(config.task.held_out_text(config, prepared, max_bytes=1).documents) == 1


def test_the_curve_of_many_batches_is_smoothed_without_lagging():
    from rafale.plot import centred_mean

    falling = [100.0 - batch for batch in range(100)]
    # A straight line is its own centred mean, ends included as far as their windows reach.
    assert centred_mean(falling, 5)[2:-2] == falling[2:-2]
    assert centred_mean(falling, 5)[0] == 99.0 and centred_mean([3.0], 51) == [3.0]
