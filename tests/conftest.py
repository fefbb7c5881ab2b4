"""pytest configuration: a staleness check of what is tested, and ISA parametrization that skips only
what this CPU lacks."""
from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

import qie_ep

ROOT = Path(__file__).resolve().parent.parent


def _stale_reasons() -> list[str]:
    """Why the qie_ep being tested is not the source tree's (empty when it is).

    Plain ``pytest`` imports the copy that ``pip install .`` put in the virtual environment: after an
    edit it would silently test old code. The Python files must equal the source tree's and the
    library must be newer than every C++ source (``QIE_LIBRARY`` names a library on purpose: trusted).
    """
    reasons = []
    pkg = Path(qie_ep.__file__).resolve().parent
    src = ROOT / "qie_ep"
    if pkg != src:
        for f in src.rglob("*.py"):
            twin = pkg / f.relative_to(src)
            if not twin.exists() or not filecmp.cmp(f, twin, shallow=False):
                reasons.append(f"installed {twin} differs from {f}")
    if not os.environ.get("QIE_LIBRARY"):
        lib = Path(qie_ep.library_path())
        newest = max((f for f in (ROOT / "ort_plugin").rglob("*") if f.is_file()), key=lambda f: f.stat().st_mtime)
        if newest.stat().st_mtime > lib.stat().st_mtime:
            reasons.append(f"{lib} is older than {newest}")
    return reasons


def pytest_configure(config):
    reasons = _stale_reasons()
    if reasons:
        pytest.exit("qie under test is stale (run `make build`, or `make test`):\n  " + "\n  ".join(reasons[:5]), returncode=4)

def pytest_collection_modifyitems(config, items):
    """Each test is marked with its folder (kernels, ort, tvm, cli, models, tools): ``pytest -m "not models"``."""
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests")
        if len(rel.parts) > 1:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


SUPPORTED = set(qie_ep.supported_isas())


def isa_params():
    return [pytest.param(i, marks=pytest.mark.skipif(i not in SUPPORTED, reason=f"CPU lacks {i}"), id=i)
            for i in qie_ep.ISAS]


@pytest.fixture
def restore_isa():
    """Tests that force an ISA put the best one back afterwards."""
    yield
    qie_ep.force_isa(qie_ep.supported_isas()[-1])
