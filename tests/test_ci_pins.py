"""CI installs pinned versions (.ci/constraints.txt), so that a release upstream cannot turn the
suite red without a commit; the package itself keeps ranges for users."""

from __future__ import annotations

import os
import re

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (CI's); the pins are CI's concern


def _pins(name: str) -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, ".ci", name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                pkg, _, version = line.partition("==")
                assert version, f".ci/{name}: {line!r} is not NAME==VERSION"
                pins[re.sub(r"[-_.]+", "-", pkg).lower()] = version
    return pins


def _norm(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def test_every_dependency_ci_installs_is_pinned():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = _pins("constraints.txt")
    missing = [r.name for r in reqs if _norm(r) not in pins]
    assert not missing, f"not pinned in .ci/constraints.txt: {missing}; refresh it with .ci/freeze"
    # The pins satisfy the package's own ranges (a pin outside them would never be installed).
    wrong = [f"{r} vs {pins[_norm(r)]}" for r in reqs if not r.specifier.contains(pins[_norm(r)], prereleases=True)]
    assert not wrong, wrong


def test_the_package_keeps_ranges_for_users():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    exact = [r for r in project["dependencies"] if "==" in r]
    assert not exact, f"pin these in .ci/constraints.txt, not in pyproject.toml: {exact}"


def test_ci_installs_with_the_pins():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        script = f.read()
    installs = [ln for ln in script.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")]
    assert installs and all("-c .ci/" in ln for ln in installs), installs
    assert _pins("airflow-constraints.txt")["apache-airflow"] in script
