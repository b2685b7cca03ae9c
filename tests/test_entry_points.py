"""Tests of the project's entry points and metadata: `./dev` (usage, the caller's folder for `tools`),
pyproject.toml (TensorFlow only in the [kit] extra, the SPDX licence) and model.py's logging (the host
program's root logger left alone)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "dev"


def run_dev(*args, cwd, env=None):
    return subprocess.run(["bash", str(DEV), *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_dev_usage_and_unknown_command(tmp_path):
    for args, code in (((), 2), (("help",), 0), (("-h",), 0)):
        result = run_dev(*args, cwd=tmp_path)
        assert result.returncode == code
        assert result.stdout.startswith("usage: ./dev COMMAND")
        assert "set -euo" not in result.stdout and "tools ARGS" in result.stdout
    result = run_dev("nope", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'nope'" in result.stderr and "usage: ./dev" in result.stderr


def test_dev_tools_keeps_the_callers_folder_demo_runs_in_the_repository(tmp_path):
    venv = tmp_path / "venv"  # an environment that looks installed: setup() leaves it as it is
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "tools"):
        (venv / "bin" / name).write_text('#!/bin/sh\necho "$PWD|$*"\n')
        (venv / "bin" / name).chmod(0o755)
    (venv / ".installed").touch()
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    result = run_dev("tools", "convert", "photos/", "--out", "data", cwd=caller, env={"AUTODL_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{caller.resolve()}|convert photos/ --out data"
    result = run_dev("demo", "--no-progress", cwd=caller, env={"AUTODL_VENV": str(venv)})
    assert result.stdout.strip() == f"{REPO.resolve()}|demo --no-progress"


def test_pyproject_core_without_tensorflow_kit_extra_and_licence():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    core = " ".join(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    assert "tensorflow" not in core and "pandas" not in core and "protobuf" not in core
    assert any(d.startswith("tensorflow-cpu") for d in extras["kit"])
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project["project"]["dynamic"] == ["version"]


def test_importing_model_leaves_the_root_logger_alone():
    script = textwrap.dedent("""
        import logging, sys
        root = logging.getLogger()
        before = (root.level, list(root.handlers))
        import model
        assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
        logging.getLogger("autodl_core.solver").info("solver line")
        logging.getLogger("model").debug("hidden at INFO")
        import importlib; importlib.reload(model)  # a second import adds no second handler
        logging.getLogger("meta_db.selector").info("selector line")
        logging.getLogger("host").warning("host line")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AUTODL_LOG_LEVEL": "INFO"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "line" in line or "hidden" in line]
    assert len(lines) == 3, lines
    assert lines[0].endswith("autodl_core.solver INFO: solver line")
    assert lines[1].endswith("meta_db.selector INFO: selector line")
    assert lines[2] == "host line"  # the host's own logging: Python's last-resort handler, root untouched


def test_every_tools_subcommand_prints_its_help(capsys):
    """`tools bench -h` once failed inside argparse: a help text with a bare percent sign (the background
    limit formatted as '20% of')."""
    import pytest

    from tools.cli import SUBCOMMANDS, build_parser

    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exited:
            build_parser(only=name).parse_args([name, "-h"])
        assert exited.value.code == 0, name
        assert f"usage: tools {name}" in capsys.readouterr().out, name
