"""Statements in the docs that must agree with what the code does: every backend table in docs/*.md against the
backend registry (`sparse_bias.backends`) and the choice of `sparse_bias._core.dispatch`, the signatures written in the
docs against the functions, the exact-row thresholds against the flag rule, and the dropout statements against
the dense pass's kernel choice."""
import ast
import inspect
import math
import pathlib
import re
from typing import Dict, List, NamedTuple, Optional

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core.call import Call
from sparse_bias._core.exact_rows import EXACT_ROW_RATIO, flagged_rows
from sparse_bias.attention import BACKEND_NAMES
from sparse_bias.backends import AUTO_ORDER, BACKENDS, OPS
from sparse_bias.dense import dense_kernel_name
from sparse_bias.window_attention import WINDOW_BACKENDS

from helpers import SMALL, make_case

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))

#: the comment right above a backend table that says which operation's backends it lists
MARKER = re.compile(r"<!--\s*backends:\s*(\w+)\s*-->")
#: the backends each operation accepts (``backend=``), ``"auto"`` aside: a table lists exactly these
CHOICES = {"correction": set(BACKEND_NAMES) - {"auto"}, "window": set(WINDOW_BACKENDS) - {"auto"}}
DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}
DTYPE_WORDS = ("float32", "float64", "bfloat16", "float16")


class Table(NamedTuple):
    where: str                      # "file:line" of the header
    op: Optional[str]               # from the marker comment above it
    rows: Dict[str, str]            # backend -> its "auto" cell


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def backend_tables() -> List[Table]:
    """Every table in docs/*.md whose first header cell is ``backend``."""
    tables = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
                continue
            header = _cells(line)
            if header[0] != "backend":
                continue
            auto = next(j for j, h in enumerate(header) if "auto" in h)
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows[cells[0].strip("`")] = cells[auto]
            tables.append(Table(f"{path.name}:{i + 1}", marker.group(1) if marker else None, rows))
    return tables


TABLES = backend_tables()


def _ids(tables):
    return [t.where for t in tables]


def test_the_docs_have_a_backend_table_for_each_operation():
    assert {t.op for t in TABLES} == set(OPS)


@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_each_backend_table_says_which_operation_it_lists(table):
    assert table.op in OPS, (f"{table.where}: put <!-- backends: correction --> or <!-- backends: window --> on the "
                             f"line above the table")


@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_each_backend_table_lists_exactly_the_backends_of_its_operation(table):
    missing, extra = CHOICES[table.op] - set(table.rows), set(table.rows) - CHOICES[table.op]
    assert not missing and not extra, f"{table.where}: missing rows {sorted(missing)}, rows of no backend {sorted(extra)}"


@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_the_auto_column_names_only_devices_auto_tries_the_backend_on(table):
    for name, text in table.rows.items():
        named = {d for d, word in DEVICE_WORDS.items() if word in text}
        if name == "dense":
            assert not named and "only when asked" in text, (table.where, name, text)
            continue
        supports = BACKENDS[name].supports
        assert named <= set(supports.auto_rank), (table.where, name, text)
        assert supports.devices is None or named <= set(supports.devices), (table.where, name, text)


@pytest.mark.parametrize("device", sorted(DEVICE_WORDS))
@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_auto_s_first_choice_on_each_device_is_the_row_that_names_it(table, device):
    first = next(n for n in AUTO_ORDER[device] if table.op in BACKENDS[n].supports.ops)
    assert DEVICE_WORDS[device] in table.rows.get(first, ""), f"{table.where}: auto takes {first!r} first on {device}"


@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_the_dtypes_and_head_dims_in_the_auto_column_are_the_backends(table):
    for name, text in table.rows.items():
        if name == "dense":
            continue
        supports = BACKENDS[name].supports
        named = {d for d in DTYPE_WORDS if re.search(rf"\b{d}\b", text)}
        if "every dtype" in text:
            assert len(supports.dtypes) == len(DTYPE_WORDS), (table.where, name)
        elif named:
            assert named == {str(d).replace("torch.", "") for d in supports.dtypes}, (table.where, name, text)
        m = re.search(r"head dims? up to (\d+)", text)
        if m:
            assert int(m.group(1)) == supports.max_head_dim, (table.where, name, text)
        elif supports.max_head_dim is not None and "every dtype" in text:
            pytest.fail(f"{table.where}: {name} takes head dims up to {supports.max_head_dim}; the row says no limit")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("table", TABLES, ids=_ids(TABLES))
def test_the_cpu_choice_is_the_row_that_says_cpu(table, dtype):
    win, q, k, v, wb, wc = make_case(SMALL, batch=1, heads=1, queries=2, dim=8, dtype=dtype)
    if table.op == "correction":
        name, _ = sb.select_backend(q, sb.window_bias(win, wb, wc))
    else:
        name, _ = sb.select_window_backend(q)
    assert "CPU" in table.rows[name]
    assert name == ("fused" if sb.extension_available() else "sparse")


# ---- signatures ------------------------------------------------------------------------------------------------

def _documented_signatures():
    """``(file, name, [argument texts])`` for every backticked ``Name(a, b=1, ...)`` in docs/*.md."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"`((?:sb\.|sparse_bias\.)?[A-Za-z_][\w.]*)\(", text):
            depth, j = 1, m.end()
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            if text[j:j + 1] != "`":
                continue
            args, depth, cur = [], 0, ""
            for ch in " ".join(text[m.end():j - 1].split()):
                depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
                if ch == "," and not depth:
                    args.append(cur.strip())
                    cur = ""
                else:
                    cur += ch
            args = [a for a in args + [cur.strip()] if a]
            found.append((path.name, m.group(1), args))
    return found


def _resolve(name):
    parts = re.sub(r"^(sb|sparse_bias)\.", "", name).split(".")
    for root in (sb, sb.nn):
        obj = root
        for part in parts:
            obj = getattr(obj, part, None)
        if callable(obj):
            return obj
    return None


def _signature_mentions():
    """The documented signatures (not calls): a resolvable name, more than one argument, at least one default, the
    first argument the function's first parameter."""
    out = []
    for file, name, args in _documented_signatures():
        obj = _resolve(name)
        if obj is None or len(args) < 2 or not any("=" in a for a in args):
            continue
        params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
        if params and args[0].split("=")[0] == params[0].name:
            out.append((file, name, args, params))
    return out


SIGNATURES = _signature_mentions()


def test_the_docs_write_out_the_main_signatures():
    assert {"sb.sparse_bias_attention", "sb.window_attention"} <= {name for _, name, _, _ in SIGNATURES}


@pytest.mark.parametrize("file,name,args,params", SIGNATURES, ids=[f"{f}:{n}" for f, n, _, _ in SIGNATURES])
def test_documented_signatures_match_the_code(file, name, args, params):
    by_name = {p.name: p for p in params}
    order = [p.name for p in params]
    last, keyword_only = -1, False
    for arg in args:
        if arg in ("...", "*"):
            keyword_only = keyword_only or arg == "*"
            continue
        pname, _, default = arg.lstrip("*").partition("=")
        assert pname in by_name, f"{file}: {name} has no parameter {pname!r} (it has {order})"
        p = by_name[pname]
        assert order.index(pname) > last, f"{file}: {name}: {pname!r} is out of order (the code's order: {order})"
        last = order.index(pname)
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            assert (p.kind == p.KEYWORD_ONLY) == keyword_only, f"{file}: {name}: {pname!r} is {p.kind.description}"
        if default and default != "...":
            assert ast.literal_eval(default) == p.default, f"{file}: {name}: {pname}={default}, code: {p.default!r}"


# ---- the exact-row thresholds ---------------------------------------------------------------------------------

def _threshold_share(b: float) -> float:
    """The smallest window share ``w`` of the unbiased mass that a flat bias ``b`` on the window gets flagged at,
    by bisection through the library's own flag rule (`flagged_rows`)."""
    removed_per_share, s_per_share = max(0.0, -math.expm1(b)), math.expm1(b)

    def flagged(w):
        removed = torch.tensor([[w * removed_per_share]], dtype=torch.float64)
        den = 1 + torch.tensor([[w * s_per_share]], dtype=torch.float64)
        return bool(flagged_rows(den, removed, torch.zeros(1, 1, 1, dtype=torch.float64), 1)[0, 0])

    lo, hi = 0.0, 1.0
    assert flagged(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flagged(mid) else (mid, hi)
    return hi


def test_the_exact_row_thresholds_in_the_docs_follow_the_flag_rule():
    statements = []
    for name in ("limitations.md", "attention.md"):
        text = " ".join((ROOT / "docs" / name).read_text().split())
        for m in re.finditer(r"1 / \((\d+) \(1 - e\^b\)\)", text):
            assert int(m.group(1)) == round(1 / EXACT_ROW_RATIO) + 1, f"{name}: the formula's ratio"
        statements += [(name, float(pct), float(b)) for pct, b in
                       re.findall(r"([\d.]+) %(?: of the mass)? at `b = (-[\d.]+)`", text)]
    assert {b for _, _, b in statements} >= {-5.0, -1.0}, statements
    for name, pct, b in statements:
        share = _threshold_share(b)
        assert abs(100 * share - pct) < 0.006, f"{name}: {pct} % at b = {b}; the flag rule gives {100 * share:.3f} %"
        assert abs(share - 1 / ((1 / EXACT_ROW_RATIO + 1) * -math.expm1(b))) < 1e-9


# ---- dropout ---------------------------------------------------------------------------------------------------

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
