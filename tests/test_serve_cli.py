"""``rag serve``'s command line: help, and clear errors for bad flags (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def rag(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # rich wraps error boxes at the terminal width
    return subprocess.run([sys.executable, "-m", "cli.serve", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_the_flags():
    result = rag("serve", "--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--kb", "--model", "--adapter", "--upstream"):
        assert flag in result.stdout


def test_bad_adapter_flag_is_a_usage_error(tmp_path):
    result = rag("serve", "--adapter", "no-equals-sign")
    assert result.returncode == 2 and "NAME=DIR" in result.stderr and "Traceback" not in result.stderr
    result = rag("serve", "--adapter", f"x={tmp_path / 'missing'}")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_bad_knowledge_base_name_is_a_usage_error(tmp_path):
    result = rag("serve", "--kb", "../etc")
    assert result.returncode == 2 and "--kb" in result.stderr and "Traceback" not in result.stderr
