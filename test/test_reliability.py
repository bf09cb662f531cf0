"""Reliability through the real command line: bad input is one line and exit 2; killed, interrupted, diverging and
disk-starved runs keep their checkpoints and resume exactly; checkpoints are written atomically and loaded safely.

Every test runs `rafale` in a subprocess, with real signals, on a tiny model and a tiny synthetic corpus. Processes
that do not depend on each other are started together to keep the module fast.
"""

import copy
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rafale.safety import RUN_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
# Progress bars and library warnings also go to stderr; without them an error is the only line there. One thread
# per process: a tiny model gains nothing from more, and processes started together share the cores.
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
         "OMP_NUM_THREADS": "1"}

RUN = {
    "run": {"name": "tiny", "seed": 7, "max_duration": "2ep", "max_lr": 3e-3, "warmup_pct": 0.1,
            "eval_interval": "7ba", "save_interval": "4ba", "sample_max_new_tokens": 0},
    # Dropout, so that resuming exactly also needs the random state back.
    "model": {"config": "pythia-tiny", "dropout": 0.1},
    "data": {"config": {"name": "tiny", "dataset_path": "synthetic:stories", "synthetic_documents": 30,
                        "vocab_size": 320, "max_sequence_length": 64, "train_batch_size": 8, "eval_batch_size": 8}},
    "logging": {"log_interval": 1},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the tiny corpus is prepared once; each test's run has its own run.name."""
    return tmp_path_factory.mktemp("cache")


def write_run(folder: Path, name: str, **sections) -> Path:
    """The tiny run file, named `name`, with some keys changed: write_run(p, "x", run={"max_lr": 1.0})."""
    config = copy.deepcopy(RUN)
    config["run"]["name"] = name
    for section, values in sections.items():
        target = config[section]["config"] if section == "data" else config[section]
        target.update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(cache: Path, *args: str, preexec_fn=None, **env: str) -> subprocess.Popen:
    environment = {**os.environ, **QUIET, "RAFALE_CACHE_DIR": str(cache), **env}
    return subprocess.Popen([sys.executable, "-m", "rafale", *args], cwd=ROOT, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def rafale(cache: Path, *args: str, **env: str) -> tuple[int, str, str]:
    return finish(start(cache, *args, **env))


def one_line_error(result: tuple[int, str, str], code: int = 2) -> str:
    """The single stderr line of a run that failed as a user mistake: no traceback, nothing else."""
    returncode, out, err = result
    assert returncode == code, f"exit {returncode}\n{out[-2000:]}\n{err[-3000:]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def checkpoints(cache: Path, name: str) -> Path:
    return cache / "checkpoints" / name / "checkpoints"


def latest(cache: Path, name: str) -> str:
    return os.readlink(checkpoints(cache, name) / "latest-rank0.pt")


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def history(cache: Path, name: str) -> list[dict]:
    import json

    return [json.loads(line) for line in (cache / "checkpoints" / name / "metrics.jsonl").read_text().splitlines()]


def exported_tensors(cache: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(cache / "checkpoints" / name / "model" / "model.safetensors")


# Bad input: one line, exit 2, before anything heavy runs.

PIPELINE = "run:\n  name: x\nmodel:\n  config: pythia-tiny\ndata:\n  pipeline: gpt\n  config:\n    name: d\n"
# A run file (text, or changes to the tiny run file) and its error after `error: <run file>: `; {folder} is the
# run file's folder.
RUN_FILE_MISTAKES = [
    ("run:\n  name: [x\n", r"not valid YAML: line 3, column 1: .*"),
    ("- run\n- model\n", r"expected a mapping with sections run, model and data, got list"),
    ({"run": {"max_lrr": 1e-3}}, r"run\.max_lrr: unknown key; did you mean 'max_lr'\?"),
    ({"run": {"max_lr": "fast"}}, r"run\.max_lr: Input should be a valid number.*\(got 'fast'\)"),
    ({"run": {"warmup_pct": 1.5}}, r"run\.warmup_pct: must be < 1 \(got 1\.5\)"),
    ("run:\n  name: x\nmodel:\n  config: pythia-tiny\n", r"data: required key is missing"),
    (PIPELINE, r"data\.pipeline: unknown pipeline 'gpt'; valid: causal_lm, .*"),
    ({"run": {"schedule": "cosine"}}, r"run\.schedule: unknown schedule 'cosine'; valid: cosine-warmup, .*"),
    ({"run": {"optimizer": "SGD"}},
     r"run\.optimizer: unknown optimizer 'sgd'; valid: adamw, schedulefree_adamw, soap, muon, lion, adopt"),
    # Relative to the run file's folder, not to the working directory.
    ({"data": {"dataset_path": "stories.txt"}},
     r"data\.config\.dataset_path: no such file or folder: {folder}/stories\.txt"),
    ({"model": {"pretrained_path": "weights", "use_pretrained": True}},
     r"model\.pretrained_path: no such file or folder: {folder}/weights"),
    ("run:\n  name: x\n  name: y\n", r"not valid YAML: line 3, column 3: key 'name' appears twice in one section"),
    # A YAML tag that would call os.system under an unsafe loader: refused by the safe loader, nothing runs.
    ('run:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n',
     r"not valid YAML: line 2, column 9: could not determine a constructor for the tag .*os\.system'"),
]


@pytest.mark.parametrize("mistake, expected", RUN_FILE_MISTAKES)
def test_run_file_mistakes_are_one_line(tmp_path, cache, mistake, expected):
    marker = tmp_path / "ran"
    if isinstance(mistake, str):
        path = tmp_path / "run.yaml"
        path.write_text(mistake.format(marker=marker))
    else:
        path = write_run(tmp_path, "mistake", **mistake)
    line = one_line_error(rafale(cache, "-c", str(path)))
    expected = expected.replace("{folder}", re.escape(str(tmp_path)))
    assert re.fullmatch(rf"error: {re.escape(str(path))}: {expected}", line), line
    assert not marker.exists()


def test_data_mistakes_are_one_line(tmp_path, cache):
    files = {
        "empty.txt": b"\n   \n\n",
        "columns.jsonl": b'{"body": "One story.", "label": 1}\n',
        "blank.jsonl": b'{"text": ""}\n{"text": "   "}\n',
        "short.txt": "One tiny story.\n\nAnd another one.\n".encode(),
        "latin1.txt": "Un caf\u00e9.\n\nDeux ".encode() + "th\u00e9".encode("latin-1") + b".\n",
        "tokenizer.json": b'{"model": "nothing like a tokenizer"}',
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cases = {
        "empty": ({"dataset_path": "empty.txt"}, r"data\.config\.dataset_path: no documents in .*empty\.txt"),
        "column": ({"dataset_path": "columns.jsonl"},
                   r"data\.config\.text_column: column 'text' not in .*columns\.jsonl; columns: body, label"),
        "blank": ({"dataset_path": "blank.jsonl"}, r"data\.config\.dataset_path: no documents in .*blank\.jsonl"),
        "short": ({"dataset_path": "short.txt", "max_sequence_length": 4096},
                  r"data\.config\.max_sequence_length: the train split has \d+ tokens, fewer than one block of 4096.*"),
        "utf8": ({"dataset_path": "latin1.txt"},
                 r"data\.config\.dataset_path: .*latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 18\)"),
        "tokenizer": ({"tokenizer_path": "tokenizer.json"},
                      r"data\.config\.tokenizer_path: could not load tokenizer .*tokenizer\.json: .*"),
    }
    runs = {case: write_run(tmp_path, case, data=data) for case, (data, _) in cases.items()}
    processes = {case: start(cache, "data", "-c", str(path)) for case, path in runs.items()}
    for case, process in processes.items():
        line = one_line_error(finish(process))
        assert re.fullmatch(rf"error: {cases[case][1]}", line), (case, line)


def test_weights_mistakes_are_one_line(tmp_path, cache):
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models

    from rafale.models import build_model, save_pretrained

    def tokenizer(size: int) -> Tokenizer:
        return Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))

    def folder(name: str, **overrides) -> Path:
        return save_pretrained(build_model("pythia-tiny", overrides), tmp_path / name, tokenizer=tokenizer(100))

    good = folder("good")
    weights = good / "model.safetensors"
    no_weights = folder("no_weights")
    (no_weights / "model.safetensors").unlink()
    truncated = folder("truncated")
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = folder("garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 4096)
    # Tensors of a narrower model under the config of the tiny one.
    narrow = folder("narrow")
    shutil.copy(folder("narrow_source", hidden_size=32) / "model.safetensors", narrow / "model.safetensors")
    renamed = folder("renamed")
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("input_layernorm.weight"))
    tensors[name.replace("input_layernorm", "pre_norm")] = tensors.pop(name)
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    big_vocabulary = folder("big_vocabulary")
    tokenizer(1000).save(str(big_vocabulary / "tokenizer.json"))

    cases = {
        no_weights: r"no model\.safetensors or model\.safetensors\.index\.json",
        truncated / "model.safetensors": r"not a valid safetensors file \(.*\)",
        garbage / "model.safetensors": r"not a valid safetensors file \(.*\)",
        narrow / "model.safetensors": r"gpt_neox\.embed_in\.weight has shape \[128, 32\], "
                                      r"the model expects \[128, 64\]",
        renamed: rf"missing tensors: {re.escape(name)}; unexpected tensors: "
                 rf"{re.escape(name.replace('input_layernorm', 'pre_norm'))}",
        big_vocabulary / "tokenizer.json": r"has 1000 tokens but the model's vocabulary is 128; .*",
    }
    processes = {where: start(cache, "generate", str(where.parent if where.suffix else where), "-p", "w1 w2")
                 for where in cases}
    for where, process in processes.items():
        line = one_line_error(finish(process))
        assert re.fullmatch(rf"error: {re.escape(str(where))}: {cases[where]}", line), line
    code, out, err = rafale(cache, "generate", str(good), "-p", "w1 w2", "-n", "3")
    assert code == 0, err


# Faults: real processes, really killed.


def test_two_data_runs_at_once_build_once(tmp_path, cache):
    run_file = write_run(tmp_path, "together", data={"synthetic_documents": 31})
    processes = [start(cache, "-c", str(run_file), DATA="1") for _ in range(2)]
    results = [finish(process) for process in processes]
    assert [code for code, _, _ in results] == [0, 0], results
    outcomes = sorted(re.search(r"\((built|reused)\)", out).group(1) for _, out, _ in results)
    assert outcomes == ["built", "reused"]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """A run trained from start to end without a stop: 2 epochs of 14 batches, checkpoints every 4."""
    run_file = write_run(tmp_path_factory.mktemp("reference"), "reference")
    code, out, err = rafale(cache, "-c", str(run_file))
    assert code == 0, out + err
    return cache / "checkpoints" / "reference"


def test_killed_then_interrupted_run_resumes_bit_for_bit(tmp_path, cache, reference):
    run_file = write_run(tmp_path, "resumed")
    saved = checkpoints(cache, "resumed")

    killed = start(cache, "-c", str(run_file))
    wait_for(lambda: (saved / "ep0-ba8-rank0.pt").exists(), killed, "the checkpoint at batch 8")
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    # Resumes from batch 8; Ctrl-C in the second epoch saves a checkpoint and says how to go on.
    interrupted = start(cache, "-c", str(run_file))
    for line in interrupted.stdout:
        if line.startswith("[batch 18/"):
            interrupted.send_signal(signal.SIGINT)
    code, out, err = finish(interrupted)
    assert code == 130, err
    message = err.strip().splitlines()[-1]
    stopped = re.fullmatch(rf"SIGINT: stopped at batch (\d+), checkpoint saved to {re.escape(str(saved))}/"
                           rf"ep1-ba(\d+)-rank0\.pt; resume with: rafale -c {re.escape(str(run_file))}", message)
    assert stopped and stopped.group(1) == stopped.group(2), message
    assert latest(cache, "resumed") == f"ep1-ba{stopped.group(1)}-rank0.pt"
    assert not (cache / "checkpoints" / "resumed" / "model").exists()

    code, out, err = rafale(cache, "-c", str(run_file))
    assert code == 0, err
    assert f"resumed from the latest checkpoint in {saved} at batch {stopped.group(1)}" in out

    ours, theirs = exported_tensors(cache, "resumed"), exported_tensors(cache, "reference")
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different

    # metrics.jsonl reads as one run: each batch once, in order, with the losses of the run that never stopped.
    ours, theirs = history(cache, "resumed"), history(cache, "reference")
    assert [row["batch"] for row in ours] == list(range(29))
    assert [row.get("train/loss") for row in ours] == [row.get("train/loss") for row in theirs]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, cache):
    run_file = write_run(tmp_path, "terminated")
    process = start(cache, "-c", str(run_file))
    for line in process.stdout:
        if line.startswith("[batch 3/"):
            process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 143, err
    stopped = re.search(r"SIGTERM: stopped at batch (\d+), checkpoint saved to .*/ep0-ba(\d+)-rank0\.pt; "
                        r"resume with: rafale -c ", err)
    assert stopped and stopped.group(1) == stopped.group(2), err
    assert latest(cache, "terminated") == f"ep0-ba{stopped.group(1)}-rank0.pt"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, cache):
    # A real divergence: an absurd learning rate without clipping overflows the weights within a few steps.
    run_file = write_run(tmp_path, "diverges", run={"max_lr": 1e30, "clip_type": "none", "save_interval": "1ba",
                                                   "max_duration": "12ba"})
    line = one_line_error(rafale(cache, "-c", str(run_file)), code=3)
    stopped = re.fullmatch(r"error: the training loss is -?(?:nan|inf) at batch (\d+); training stopped and the last "
                           r"checkpoint, (.*), is kept; .*", line)
    assert stopped, line
    batch = int(stopped.group(1))
    assert batch > 1
    assert stopped.group(2) == str(checkpoints(cache, "diverges") / f"ep0-ba{batch - 1}-rank0.pt")
    assert latest(cache, "diverges") == f"ep0-ba{batch - 1}-rank0.pt"
    assert not (checkpoints(cache, "diverges") / f"ep0-ba{batch}-rank0.pt").exists()
    assert not (cache / "checkpoints" / "diverges" / "model").exists()


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_latest(tmp_path, cache):
    # A wide vocabulary makes checkpoints big enough (about 12 MB) to be caught in the middle of their writing.
    run_file = write_run(tmp_path, "big", run={"max_duration": "4ba", "save_interval": "2ba",
                                              "eval_interval": "100ba"}, model={"vocab_size": 8192})
    saved = checkpoints(cache, "big")
    process = start(cache, "-c", str(run_file))
    wait_for(lambda: saved.is_dir() and any(p.name.endswith(".ep0-ba4-rank0.pt") for p in saved.iterdir()),
             process, "the checkpoint at batch 4 to start")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest(cache, "big") == "ep0-ba2-rank0.pt"
    assert [p.name for p in saved.glob(".partial-*")], "the kill came after the write"
    assert not (saved / "ep0-ba4-rank0.pt").exists()
    # What a writer without the temporary name would have left: a truncated checkpoint that `latest` does not
    # point to. It is ignored, then replaced.
    (saved / "ep0-ba4-rank0.pt").write_bytes((saved / "ep0-ba2-rank0.pt").read_bytes()[:1000])

    code, out, err = rafale(cache, "-c", str(run_file))
    assert code == 0, err
    assert f"resumed from the latest checkpoint in {saved} at batch 2" in out
    assert not list(saved.glob(".partial-*"))
    assert latest(cache, "big") == "ep0-ba4-rank0.pt"
    from rafale.safety import load_checkpoint_safely

    assert load_checkpoint_safely(saved / "ep0-ba4-rank0.pt")["state"]["timestamp"]["Timestamp"]["batch"] == 4


def test_runs_refused_before_training(tmp_path, cache, reference):
    """Checkpoints of another model, of a run with other settings, a pickle, a dangling `latest`, weights of another
    shape, an unknown preset, a full disk: each is one line, and nothing that was saved is lost."""

    def copy_run(name: str, settings: bool = False) -> Path:
        """The reference run's checkpoints under another run.name; with `settings`, the settings they were written
        with too (without, they are as checkpoints from before rafale kept them: only their tensors are checked)."""
        shutil.copytree(reference / "checkpoints", checkpoints(cache, name), symlinks=True)
        if settings:
            shutil.copy(reference / RUN_SETTINGS, checkpoints(cache, name).parent)
        return checkpoints(cache, name)

    copy_run("reshaped")
    run_reshaped = write_run(tmp_path, "reshaped", model={"hidden_size": 128})

    edited = copy_run("edited", settings=True)
    edited_files = {path.name: path.read_bytes() for path in edited.iterdir()}
    run_edited = write_run(tmp_path, "edited", run={"max_lr": 1e-3}, data={"synthetic_documents": 40})

    pickled = copy_run("pickled")
    marker = tmp_path / "ran"
    state = torch.load(pickled / "latest-rank0.pt", weights_only=False)
    state["state"]["callbacks"]["Evil"] = Evil(marker)
    torch.save(state, pickled / "latest-rank0.pt")
    run_pickled = write_run(tmp_path, "pickled")

    dangling = copy_run("dangling")
    target = latest(cache, "dangling")
    (dangling / target).unlink()
    run_dangling = write_run(tmp_path, "dangling")

    run_pretrained = write_run(tmp_path, "pretrained", model={"use_pretrained": True, "hidden_size": 128,
                                                               "vocab_size": 320,
                                                               "pretrained_path": str(reference / "model")})
    run_preset = write_run(tmp_path, "preset", model={"config": "pythia-huge"})

    # A disk that is full: no file may grow past 100 kB, so the next checkpoint cannot be written.
    # With the settings of the run it continues: a longer duration is one of the changes a resume may make.
    full = copy_run("full", settings=True)
    resumed_from = latest(cache, "full")
    run_full = write_run(tmp_path, "full", run={"max_duration": "3ep"})

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    processes = {
        "reshaped": start(cache, "-c", str(run_reshaped)),
        "edited": start(cache, "-c", str(run_edited)),
        "pickled": start(cache, "-c", str(run_pickled)),
        "dangling": start(cache, "-c", str(run_dangling)),
        "pretrained": start(cache, "-c", str(run_pretrained)),
        "preset": start(cache, "-c", str(run_preset)),
        "full": start(cache, "-c", str(run_full), preexec_fn=small_files),
    }
    lines = {case: one_line_error(finish(process)) for case, process in processes.items()}

    assert re.fullmatch(rf"error: {re.escape(str(checkpoints(cache, 'reshaped')))}/ep1-ba28-rank0\.pt: run\.name "
                        r"'reshaped' already has checkpoints of another model \(model\.\S+: \[\d+, 64\] in the "
                        r"checkpoint, \[\d+, 128\] in this run file\); use a new run\.name, or delete .*reshaped to "
                        r"start over", lines["reshaped"]), lines["reshaped"]
    assert lines["edited"] == (f"error: {run_edited}: run.name 'edited' has checkpoints of a run with other settings "
                               f"(data.config.synthetic_documents: 30 -> 40; run.max_lr: 0.003 -> 0.001); rerun with "
                               f"those settings to resume it, use a new run.name, or delete {edited.parent} to start "
                               f"over")
    assert {path.name: path.read_bytes() for path in edited.iterdir()} == edited_files
    assert re.fullmatch(r"error: .*pickled/checkpoints/ep1-ba28-rank0\.pt: refused: the checkpoint holds objects "
                        r"other than tensors and plain data \(loading it could run code\).*", lines["pickled"])
    assert not marker.exists()
    assert lines["dangling"] == (f"error: {dangling / 'latest-rank0.pt'}: points to {target}, which is missing; "
                                 f"point it at another checkpoint of {dangling}, or delete {dangling} to start over")
    assert re.fullmatch(rf"error: {re.escape(str(reference / 'model' / 'model.safetensors'))}: \S+ has shape "
                        r"\[\d+, 64\], the model expects \[\d+, 128\]", lines["pretrained"]), lines["pretrained"]
    assert re.fullmatch(r"error: .*model\.config: unknown preset 'pythia-huge'; valid: .*pythia-tiny.*",
                        lines["preset"]), lines["preset"]
    assert re.fullmatch(rf"error: {re.escape(str(full))}/ep2-ba32-rank0\.pt: could not write the checkpoint "
                        rf"\(.*\); {resumed_from} is kept; free some disk space .* and rerun to resume",
                        lines["full"]), lines["full"]
    assert latest(cache, "full") == resumed_from
    assert not list(full.glob(".partial-*"))


class Evil:
    """Unpickling this runs a command: what a checkpoint from a stranger could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
