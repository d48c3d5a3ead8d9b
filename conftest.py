"""Root conftest: names available to the docstring examples (pytest --doctest-modules)."""
import pytest
import torch

import sparse_bias as sb


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, sb=sb, **{n: getattr(sb, n) for n in sb.__all__})
