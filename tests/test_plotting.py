"""The plots a researcher reads: the bias of a few queries (one row each, the projected point marked, the window
outlined, axes in cells, a colour bar) and the benchmark comparison (seconds and MiB, the setup in the title)."""
import pytest
import torch

import sparse_bias as sb
from sparse_bias.tools.synthetic import synthetic_scene

pytest.importorskip("matplotlib")
from matplotlib.patches import Rectangle  # noqa: E402

from sparse_bias.tools import plotting  # noqa: E402


@pytest.fixture(scope="module")
def scene_bias():
    scene = synthetic_scene(1, 48, config="small", seed=0)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, bev_window=7, cam_window=5)
    gen = torch.Generator().manual_seed(0)
    bias = sb.window_bias(win, torch.rand(1, 48, generator=gen), torch.rand(1, 48, generator=gen))
    two_views = int((scene.cam_pos[0, :, 1, 0] >= 0).nonzero()[0])
    no_camera = int((scene.cam_pos[0, :, 0, 0] < 0).nonzero()[0])
    return scene, bias, [two_views, no_camera, 0]


def _panels(fig, query):
    return [ax for ax in fig.axes if ax.get_label().startswith(f"query {query}: ")]


def _markers(ax):
    return [line for line in ax.lines if line.get_marker() == "+"]


def _windows(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_label() == "window"]


def test_one_row_per_query_with_its_views_point_and_window(scene_bias):
    scene, bias, queries = scene_bias
    fig = plotting.query_bias_figure(bias, batch=0, queries=queries)
    try:
        rows = {}
        for ax in fig.axes:
            if ax.get_label().startswith("query "):
                rows.setdefault(ax.get_label().split(":")[0], set()).add(ax.get_subplotspec().rowspan.start)
        assert rows == {f"query {q}": {r} for r, q in enumerate(queries)}          # one grid row per query, in order
        for query in queries:
            axes = _panels(fig, query)
            views = [int(v) for v in scene.cam_pos[0, query, :, 0] if v >= 0]
            drawn = [ax for ax in axes if ax.get_images()]
            labels = [ax.get_label() for ax in drawn]
            assert labels == [f"query {query}: BEV"] + [f"query {query}: camera view {v}" for v in views]
            row, col = (int(x) for x in scene.bev_pos[0, query])
            bev = drawn[0]
            (marker,) = _markers(bev)
            assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (col, row)       # x = column, y = row
            (window,) = _windows(bev)
            assert window.get_width() == window.get_height() == 7                   # 7x7, not clipped here
            assert window.get_x() == col - 3.5 and window.get_y() == row - 3.5
            assert bev.get_xlabel() == "BEV x (cells)" and bev.get_ylabel() == "BEV y (cells)"
            assert f"row {row}, col {col}" in bev.get_title()
            for ax, view in zip(drawn[1:], views):
                m = list(scene.cam_pos[0, query, :, 0]).index(view)
                vr, vc = (int(x) for x in scene.cam_pos[0, query, m, 1:])
                (marker,) = _markers(ax)
                assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (vc, vr)
                assert len(_windows(ax)) == 1
                assert ax.get_xlabel() == "image column (cells)" and ax.get_ylabel() == "image row (cells)"
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colorbars) == 1 and "bias" in colorbars[0].get_ylabel()
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_colour_scale_sequential_for_one_sign_diverging_for_both(scene_bias):
    scene, bias, queries = scene_bias
    panels = [p for q in queries for p in plotting.query_panels(bias, 0, q)]
    cmap, vmin, vmax = plotting._colour_scale(panels)
    assert cmap.name.startswith("viridis") and vmin == 0.0 and vmax == pytest.approx(
        max(float(p.values.nan_to_num(0).max()) for p in panels))
    signed = sb.window_bias(bias.index, torch.full((1, 48), 0.5), torch.full((1, 48), -1.0))
    cmap, vmin, vmax = plotting._colour_scale([p for q in queries for p in plotting.query_panels(signed, 0, q)])
    assert cmap.name.startswith("RdBu") and vmin == -vmax == pytest.approx(-1.0)


def test_panels_keep_queries_apart_and_clip_at_the_border():
    layout = sb.KeyLayout(bev_shape=(20, 20), cam_shape=(2, 10, 10))
    bev_pos = torch.tensor([[[0, 10], [0, 11]]])                     # neighbours: their windows overlap
    cam_pos = torch.tensor([[[[1, 9, 9]], [[-1, -1, -1]]]])
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=5, cam_window=5)
    bias = sb.window_bias(win, torch.ones(1, 2), torch.ones(1, 2))
    first, second = plotting.query_panels(bias, 0, 0), plotting.query_panels(bias, 0, 1)
    assert [(p.kind, p.view) for p in first] == [("bev", None), ("camera", 1)]
    assert [(p.kind, p.view) for p in second] == [("bev", None)]
    assert float(first[0].values.nansum()) == 15.0                   # its own 3x5 window, not the sum of both
    assert first[0].box == (0, 2, 8, 12) and first[0].centre == (0, 10) and first[0].clipped
    assert first[1].box == (7, 9, 7, 9) and first[1].centre == (9, 9) and first[1].size == 5
    with pytest.raises(ValueError, match="query=2"):
        plotting.query_panels(bias, 0, 2)


def test_plot_query_bias_writes_a_png(scene_bias, tmp_path):
    _, bias, queries = scene_bias
    path = plotting.plot_query_bias(bias, str(tmp_path / "q.png"), queries=queries[:1], title="t")
    assert (tmp_path / "q.png").stat().st_size > 10_000 and path.endswith("q.png")


def test_comparison_shows_seconds_and_mib_of_both_passes_and_the_setup():
    rows = [dict(variant=v, chosen=c, fwd_time_s=f, time_s=b, peak_rss_mib=m, fwd_peak_rss_mib=m / 2)
            for v, c, f, b, m in (("sdpa", "", 0.65, 2.38, 859.0), ("sparse-auto", "fused", 0.70, 2.50, 911.0),
                                  ("dense-bias", "", 3.49, 8.88, 10465.0))]
    fig = plotting.comparison_figure(rows, setup="fusion layout, B=2, H=8, Q=900, K=56400, D=32, float32")
    try:
        title = fig._suptitle.get_text()
        assert "B=2, H=8, Q=900, K=56400, D=32, float32" in title
        assert f"{torch.get_num_threads()} threads" in title and "torch" in title
        time_ax, mem_ax = fig.axes
        assert "[s]" in time_ax.get_ylabel() and "[MiB]" in mem_ax.get_ylabel()
        for ax in (time_ax, mem_ax):
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["forward", "forward + backward"]
        labels = [t.get_text() for t in time_ax.texts]
        assert "2.380 s\n1.00x" in labels and "8.880 s\n3.73x" in labels and "0.650 s\n1.00x" in labels
        assert "10465 MiB\n12.18x" in [t.get_text() for t in mem_ax.texts]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_machine_description_names_the_threads():
    assert plotting.machine_description().endswith(f"{torch.get_num_threads()} threads")
