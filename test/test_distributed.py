"""Several processes through Composer's launcher: two CPU processes (gloo) train exactly like one with the same
global batch, only rank 0 tokenizes, prints and exports, and checkpoints resume on another number of processes.

The CPU tests run on any machine (run.device "cpu"); the FSDP test needs CUDA and is skipped without it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8

# Global batch 8 (4 per rank on two processes), no dropout (pythia-tiny has none), shuffled training blocks:
# Composer's distributed sampler draws one permutation from the seed whatever the number of ranks and gives rank r
# every world_size-th block of it, so global batch b holds the same blocks on one process as on two.
RUN = """\
run:
  name: "tiny"
  checkpoint_dir: "{checkpoints}"
  seed: 7
  max_duration: "{steps}ba"
  max_lr: 3e-3
  warmup_pct: 0.1
  eval_interval: "{steps}ba"
  save_interval: "4ba"
  device: "{device}"
  parallelism: "{parallelism}"
  precision: "{precision}"
  sample_prompts: ["Once upon a time"]
  sample_max_new_tokens: 4
model:
  config: "pythia-tiny"
data:
  pipeline: "causal_lm"
  config:
    name: "tiny-stories"
    dataset_path: "synthetic:stories"
    synthetic_documents: 400
    vocab_size: 320
    max_sequence_length: 64
    train_batch_size: {batch}
    eval_batch_size: 8
logging:
  log_interval: 1
"""


def write_run(folder: Path, name: str, batch: int = 8, device: str = "cpu", parallelism: str = "ddp",
              precision: str = "auto") -> Path:
    """A run file whose checkpoints and export go to folder/name/tiny/."""
    path = folder / f"{name}.yaml"
    path.write_text(RUN.format(checkpoints=name, steps=STEPS, batch=batch, device=device, parallelism=parallelism,
                               precision=precision))
    return path


def environment(cache: Path) -> dict:
    # Two processes share two cores: one thread each.
    return {**os.environ, "RAFALE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}


def single(run_file: Path, cache: Path) -> tuple[int, str]:
    """`python rafale/main -c RUN.yaml`: one process, no launcher."""
    result = subprocess.run([sys.executable, "rafale/main", "-c", str(run_file)], cwd=ROOT, env=environment(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return result.returncode, result.stdout


def launch(run_file: Path, cache: Path, nproc: int) -> tuple[int, str, str]:
    """`composer -n NPROC rafale/main -c RUN.yaml` (the launcher's module, so that the test's Python runs it).

    Returns the exit code, rank 0's output (the launcher passes it through) and rank 1's (kept in a file).
    """
    logs = run_file.with_suffix(".logs")
    logs.mkdir()
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc), "--stdout",
               str(logs / "rank{rank}.txt"), "rafale/main", "-c", str(run_file)]
    result = subprocess.run(command, cwd=ROOT, env=environment(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    rank1 = logs / "rank1.txt"
    return result.returncode, result.stdout, rank1.read_text() if rank1.exists() else ""


def losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"\[batch \d+/\d+\] loss (\S+)", output)]


def export(folder: Path, name: str) -> dict:
    return load_file(str(folder / name / "tiny" / "model" / "model.safetensors"))


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[key] - theirs[key]).abs().max().item() for key in ours)


def resume_from(folder: Path, source: str, name: str, batch: int = 4, **settings: str) -> Path:
    """A new run folder whose only checkpoint is `source`'s at `batch`, as autoresume finds it, and its run file."""
    checkpoints = folder / name / "tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoint = f"ep0-ba{batch}-rank0.pt"
    (checkpoints / checkpoint).write_bytes((folder / source / "tiny" / "checkpoints" / checkpoint).read_bytes())
    (checkpoints / "latest-rank0.pt").symlink_to(checkpoint)
    return write_run(folder, name, **settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run file trained on two processes (first, so that it builds the data cache) and on one."""
    folder = tmp_path_factory.mktemp("distributed")
    cache = folder / "cache"
    two = launch(write_run(folder, "two"), cache, nproc=2)
    one = single(write_run(folder, "one"), cache)
    return folder, cache, two, one


def test_two_processes_train_like_one_and_only_rank_zero_tokenizes_prints_and_exports(runs):
    folder, cache, (code, rank0, rank1), (single_code, single_output) = runs
    assert code == 0, rank0 + rank1
    assert single_code == 0, single_output

    # Rank 0 built the data; rank 1 waited for its folder and read it, without ever contending for the build lock.
    assert rank0.count("(built)") == 1
    assert "(reused)" in single_output
    assert [p.name for p in (cache / "data").iterdir() if p.is_dir()] == [re.search(r"data/(\S+) \(built", rank0)[1]]
    for rank0_only in ("data:", "waiting for another process", "Tokenizing", "[batch", "samples:", "exported"):
        assert rank0_only not in rank1, rank1
    assert "samples:" in rank0 and "model exported" in rank0

    # Monolithic checkpoints, written by rank 0 alone.
    checkpoints = sorted(p.name for p in (folder / "two" / "tiny" / "checkpoints").iterdir())
    assert checkpoints == ["ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt", "latest-rank0.pt"]

    # The same global batches and seed: the same losses (the printed loss is the global batch's) and weights.
    assert len(losses(rank0)) == STEPS and len(losses(single_output)) == STEPS
    assert losses(rank0) == pytest.approx(losses(single_output), abs=1e-4 + 1e-9)  # printed to 4 decimals
    assert max_difference(export(folder, "two"), export(folder, "one")) < 1e-4


def test_checkpoints_resume_on_another_number_of_processes(runs):
    folder, cache, _, _ = runs
    uninterrupted = export(folder, "one")

    code, output = single(resume_from(folder, "two", "two_then_one"), cache)
    assert code == 0, output
    assert "resumed from the latest checkpoint" in output and "at batch 4" in output
    # The global batches after the checkpoint are those that the uninterrupted run saw.
    assert max_difference(export(folder, "two_then_one"), uninterrupted) < 1e-4

    code, rank0, rank1 = launch(resume_from(folder, "one", "one_then_two"), cache, nproc=2)
    assert code == 0, rank0 + rank1
    assert "resumed from the latest checkpoint" in rank0 and "at batch 4" in rank0
    assert max_difference(export(folder, "one_then_two"), uninterrupted) < 1e-4


def test_the_global_batch_must_divide_among_the_processes(runs):
    folder, cache, _, _ = runs
    code, rank0, rank1 = launch(write_run(folder, "odd", batch=7), cache, nproc=2)
    # Both ranks stop with exit 2 while reading the run file. The launcher reports rank 0's code, unless rank 1
    # reported first and the launcher stopped rank 0 (then its SIGTERM, -15): non-zero either way.
    assert code != 0
    assert ("data.config.train_batch_size: 7 is a global batch size and must divide evenly among the 2 "
            "processes") in rank0 + rank1
    assert "Traceback" not in rank0 + rank1


def test_fsdp_needs_gpus(tmp_path):
    code, output = single(write_run(tmp_path, "fsdp", parallelism="fsdp"), tmp_path / "cache")
    assert code == 2
    assert output.strip().splitlines()[-1].endswith("run.parallelism: 'fsdp' needs GPUs; use 'ddp' on CPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")
def test_fsdp_trains_resumes_without_fsdp_and_exports_the_whole_model(tmp_path):
    from rafale.models import load_pretrained

    cache = tmp_path / "cache"
    nproc = min(2, torch.cuda.device_count())
    # fp32 on both sides, so that the FSDP run and the one resumed without FSDP are comparable.
    gpu = dict(device="gpu", precision="fp32")
    code, rank0, rank1 = launch(write_run(tmp_path, "fsdp", parallelism="fsdp", **gpu), cache, nproc)
    assert code == 0, rank0 + rank1
    assert "model exported" in rank0
    # Every tensor whole, with the names and shapes of a single-device model.
    load_pretrained(tmp_path / "fsdp" / "tiny" / "model")

    # FSDP's checkpoints are whole ("full"): one process without FSDP resumes it and ends where FSDP ended.
    code, output = single(resume_from(tmp_path, "fsdp", "fsdp_then_ddp", **gpu), cache)
    assert code == 0, output
    assert "resumed from the latest checkpoint" in output
    assert max_difference(export(tmp_path, "fsdp_then_ddp"), export(tmp_path, "fsdp")) < 1e-3
