"""pytest configuration: ISA parametrization that skips only what this CPU lacks."""
from __future__ import annotations

import pytest

import qie_ep

SUPPORTED = set(qie_ep.supported_isas())


def isa_params():
    return [pytest.param(i, marks=pytest.mark.skipif(i not in SUPPORTED, reason=f"CPU lacks {i}"), id=i)
            for i in qie_ep.ISAS]


@pytest.fixture
def restore_isa():
    """Tests that force an ISA put the best one back afterwards."""
    yield
    qie_ep.force_isa(qie_ep.supported_isas()[-1])
