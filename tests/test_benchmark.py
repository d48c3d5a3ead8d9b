"""The benchmark in its quick (dry-run) mode: every variant runs, is checked, and is tabulated."""
import re

from sparse_bias.tools import benchmark


def _ratio_ok(printed_ratio, num, den, ratio_digits, num_digits, den_digits):
    """Whether a ratio printed with ``ratio_digits`` decimals can be num / den for the unrounded values behind
    ``num`` and ``den`` (printed with ``num_digits`` / ``den_digits`` decimals)."""
    hn, hd, hr = 0.5 * 10 ** -num_digits, 0.5 * 10 ** -den_digits, 0.5 * 10 ** -ratio_digits
    lo = (num - hn) / (den + hd)
    hi = (num + hn) / (den - hd) if den > hd else float("inf")
    return lo - hr - 1e-12 <= printed_ratio <= hi + hr + 1e-12


def check_table_recomputes(out):
    """Recompute every ratio column of `format_table`'s output from the numbers printed beside it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("x sdpa", "peak RSS")):
            break
        cells = line[20:].split()
        rows.append(dict(name=line[:20].strip(), fwd=float(cells[0]), xfwd=float(cells[1]), both=float(cells[2]),
                         xboth=float(cells[3]), rss=float(cells[4]), xrss=float(cells[5]), extra=float(cells[6]),
                         xextra=float(cells[7].strip("()x")), err=cells[8]))
    base = rows[0]
    assert base["name"] == "sdpa" and len(rows) > 1
    for r in rows:
        assert _ratio_ok(r["xfwd"], r["fwd"], base["fwd"], 3, 3, 3), r
        assert _ratio_ok(r["xboth"], r["both"], base["both"], 3, 3, 3), r
        assert _ratio_ok(r["xrss"], r["rss"], base["rss"], 3, 0, 0), r
        assert _ratio_ok(r["xextra"], r["extra"], base["extra"], 2, 0, 0), r
    fwd_only = next(line for line in lines if line.startswith("peak RSS of a forward-only step: "))
    found = re.findall(r"(\S+) (\d+) MiB \(([\d.]+)x\)", fwd_only)
    assert len(found) == len(rows)
    base_mib = float(found[0][1])
    for _, mib, ratio in found:
        assert _ratio_ok(float(ratio), float(mib), base_mib, 3, 0, 0), fwd_only
    return rows


def test_benchmark_quick(capsys):
    rows = benchmark.main(["--quick", "--repeats", "3"])
    out = capsys.readouterr().out
    names = [r["variant"] for r in rows]
    assert names[0] == "sdpa" and names[-1] == "dense-bias" and "sparse-auto" in names
    assert all(r["max_rel_error"] < benchmark.CHECK_TOLERANCE for r in rows if r["variant"] != "sdpa")
    assert "x sdpa" in out and "exactness" in out and "median of 3" in out
    # every ratio is the ratio of the medians shown: exactly from the rows, within rounding from the table
    base = rows[0]
    for r in rows:
        assert r["time_ratio"] == r["time_s"] / base["time_s"]
        assert r["fwd_time_ratio"] == r["fwd_time_s"] / base["fwd_time_s"]
    assert len(check_table_recomputes(out)) == len(rows)


def test_table_recomputes_from_made_up_rows():
    times = {"sdpa": (0.649, 2.380), "sparse-auto": (0.699, 2.504), "dense-bias": (3.490, 8.882)}
    rows = [dict(variant=v, chosen="", fwd_time_s=f, time_s=b, fwd_time_ratio=f / times["sdpa"][0],
                 time_ratio=b / times["sdpa"][1], peak_rss_mib=859.0 + i * 50, setup_rss_mib=504.0,
                 fwd_peak_rss_mib=506.0 + i, fwd_setup_rss_mib=400.0, max_rel_error=None if not i else 1.4e-6)
            for i, (v, (f, b)) in enumerate(times.items())]
    out = benchmark.format_table(rows)
    assert "1.077" in out                                    # 0.699 / 0.649, not a median of per-repeat ratios
    check_table_recomputes(out)


def test_sweep_quick(tmp_path):
    rows = benchmark.main(["--quick", "--sweep", "--out", str(tmp_path), "--variants", "sdpa", "sparse-auto"])
    assert {r["swept"] for r in rows} == {"queries", "window", "layout"}
    assert {r["pass_"] for r in rows} == {"forward", "forward+backward"}
    for name in ("sweep.csv", "sweep.json", "sweep_queries.png", "sweep_window.png", "sweep_layout.png"):
        assert (tmp_path / name).stat().st_size > 0
    for r in rows:                                           # the x sdpa column: ratio of the medians shown
        base = next(b for b in rows if b["variant"] == "sdpa" and b["swept"] == r["swept"]
                    and b["pass_"] == r["pass_"] and b[r["swept"]] == r[r["swept"]])
        assert abs(r["time_ratio"] - r["time_s"] / base["time_s"]) < 1e-12


def test_aqr_benchmark_quick(capsys, tmp_path):
    from sparse_bias.tools import aqr_benchmark
    result = aqr_benchmark.main(["--quick", "--json", str(tmp_path / "aqr.json")])
    out = capsys.readouterr().out
    assert [r["variant"] for r in result["rows"]] == list(aqr_benchmark.VARIANTS)
    assert result["check"]["max_rel_error"] < aqr_benchmark.CHECK_TOLERANCE
    assert "x lam-mask" in out and "window_attention alone" in out
    assert (tmp_path / "aqr.json").stat().st_size > 0
