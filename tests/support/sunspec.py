"""Comparing pvgate's values with pysunspec2's, the independent SunSpec client."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest


def same_as_pysunspec2(got: Mapping[str, Any]) -> Callable[..., None]:
    """assert_same(key, point, factor): got[key] equals pysunspec2's point.cvalue × factor within
    one step of the point's scale factor (or float32 precision when it has none)."""

    def assert_same(key: str, point: Any, factor: float = 1.0) -> None:
        want = point.cvalue * factor
        step = 10.0 ** (point.sf_value or 0) * abs(factor) if point.sf else 1e-6 * abs(want)
        assert got[key] == pytest.approx(want, abs=step + 1e-9), (key, got[key], want)

    return assert_same
