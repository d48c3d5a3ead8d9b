"""Root conftest: names available to the docstring examples (pytest --doctest-modules)."""
import pytest
import torch

import sparse_bias as sb


@pytest.fixture
def debug_checks():
    """The per-call device-value checks (NaN / +inf values and masks) on for one test (`sb.set_debug_checks`)."""
    sb.set_debug_checks(True)
    yield
    sb.set_debug_checks(False)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, sb=sb, **{n: getattr(sb, n) for n in sb.__all__})
