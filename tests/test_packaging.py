"""The package's metadata: environment.yml names the same dependencies as pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])


def _environment_pip_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*- pip:\s*$", line))
    reqs = set()
    for line in lines[start + 1:]:
        m = re.match(r"\s+- (.+?)\s*$", line)
        if not m:
            break
        reqs.add(m.group(1))
    return reqs


def test_environment_yml_matches_pyproject():
    env = _environment_pip_requirements()
    assert "-e .[dev]" in env
    assert env - {"-e .[dev]"} == _pyproject_requirements()


def test_environment_pins_python_311():
    assert re.search(r"^\s+- python=3\.11\s*$", (ROOT / "environment.yml").read_text(), re.M)


def test_console_script_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["tbps"] == "tbps_lib.cli:main"
