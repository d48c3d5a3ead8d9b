"""Statements in the docs that must agree with what the code does: the backend table of
docs/attention.md against the backend registry and `select_backend`, and the dropout statements against the dense
pass's kernel choice."""
import pathlib
import re

import pytest
import torch

import sparse_bias as sb
from sparse_bias._call import Call
from sparse_bias.backends import BACKENDS
from sparse_bias.dense import dense_kernel_name

from helpers import SMALL, make_case

ROOT = pathlib.Path(__file__).resolve().parents[1]


def backend_table():
    """``{backend: "when auto picks it" text}`` from docs/attention.md's backend table."""
    rows = {}
    for line in (ROOT / "docs" / "attention.md").read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| .* \| ([^|]*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_backend_table_lists_every_registered_backend():
    assert set(backend_table()) == set(BACKENDS) | {"dense"}


def test_the_triton_row_names_the_dtypes_the_backend_supports():
    text = backend_table()["triton"]
    named = {d for d in ("float32", "bfloat16", "float16", "float64") if re.search(rf"\b{d}\b", text)}
    assert named == {str(d).replace("torch.", "") for d in BACKENDS["triton"].supports.dtypes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_cpu_choice_is_the_row_that_says_cpu(dtype):
    win, q, k, v, wb, wc = make_case(SMALL, batch=1, heads=1, queries=2, dim=8, dtype=dtype)
    name, _ = sb.select_backend(q, sb.window_bias(win, wb, wc))
    assert "CPU" in backend_table()[name]
    assert name == ("fused" if sb.extension_available() else "sparse")


def test_dropout_statements_match_the_dense_kernel_choice():
    q = torch.zeros(1, 1, 2, 8)
    kernel = dense_kernel_name(q, Call.of(q, 1.0, None, 0.1))
    doc = sb.sparse_bias_attention.__doc__
    attention_md = (ROOT / "docs" / "attention.md").read_text()
    if sb.extension_available():
        assert kernel == "cpu_dropout"
        assert "compiled flash-style CPU kernel" in doc
        assert "compiled" in attention_md
    else:
        assert kernel == "chunked" and "chunked PyTorch kernel when neither" in doc
