"""Fixtures: a PHB with 16 MiB of host memory at MEM, for both implementations."""

from __future__ import annotations

import pytest
from spapr_helpers import IMPLS, make_phb

from vfiod import spapr


@pytest.fixture(params=IMPLS, ids=lambda i: i.name)
def impl(request: pytest.FixtureRequest) -> spapr.fastpath.FastPath:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def phb(impl: spapr.fastpath.FastPath) -> spapr.Phb:
    return make_phb(impl)


@pytest.fixture
def qphb(impl: spapr.fastpath.FastPath) -> spapr.Phb:
    return make_phb(impl, qemu_compat=True)
