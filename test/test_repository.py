"""The repository keeps its promises: two quick-start commands, CI runs the README's, the docprompt is current."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```sh\n(.*?)```", readme, re.S).group(1)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert lines[0].startswith("git clone")
    return lines[1:]


def test_quick_start_has_a_run_command_and_a_test_command_and_ci_runs_the_test_command():
    run_command, test_command = quick_start_commands()
    assert "rafale/main -c test/pythia_tinystories.yaml" in run_command
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_requirements_honour_composer_pins():
    pins = dict(
        line.split("==")
        for line in (ROOT / "cpu-requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.7.0" and pins["mosaicml"] == "0.32.1"
    assert "transformers" not in pins  # a test-only reference, never a runtime dependency


def test_llm_docprompt_is_regenerated():
    result = subprocess.run([sys.executable, "scripts/make_docprompt.py", "--check"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
