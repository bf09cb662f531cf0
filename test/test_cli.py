"""The command line: three spellings of one command, a help that imports nothing heavy, one-line errors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_help_lists_the_commands_without_importing_heavy_libraries():
    code = (
        "import sys\n"
        "from rafale.cli import app\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "print(result.output)\n"
        "print('HEAVY:', sorted(m for m in ('torch', 'composer', 'datasets', 'pydantic') if m in sys.modules))\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    for command in ("train", "data", "debug", "generate"):
        assert command in result.stdout
    assert "HEAVY: []" in result.stdout


def test_three_spellings_reach_the_same_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  max_lr: -1\nmodel:\n  config: pythia-tiny\ndata:\n  config:\n    name: d\n")
    outputs = []
    for args in (["rafale/main"], ["-m", "rafale"], ["-m", "rafale", "train"]):
        args = [*args, "-c", str(bad)]
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        outputs.append(result.stderr.strip())
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] == f"error: {bad}: run.max_lr: must be > 0 (got -1)"


def test_missing_run_file_is_one_line(tmp_path):
    result = run("-m", "rafale", "-c", str(tmp_path / "nope.yaml"), env_extra={"DATA": "1"})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: run file not found"


def test_no_arguments_shows_help_and_fails():
    result = run("-m", "rafale")
    assert result.returncode == 2
    assert "Usage" in result.stdout
