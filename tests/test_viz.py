"""kdbook.viz: PNG rendering, the static-HTML-proof slider, the discrepancy table, curve plots."""
import json

import matplotlib

matplotlib.use("Agg")
import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from ipywidgets.embed import embed_data, embed_minimal_html  # noqa: E402

from kdbook.viz import (SMOKE_LINE, discrepancy_rows_html, discrepancy_table, mean_std, figure_to_png, panel_grid,  # noqa: E402
                        plot_curve_with_band, provenance, records_provenance, slider_live, slider_stack)


def _fig(k):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar(range(3), [k, 1, 2])
    return fig


def test_figure_to_png_is_a_small_png():
    png = figure_to_png(_fig(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 60_000


def test_slider_stack_links_index_to_stack_in_the_embedded_state():
    views = {t: figure_to_png(_fig(t)) for t in (0.5, 1, 4, 16)}
    box = slider_stack(views, description="τ", initial=4)
    slider, stack = box.children
    assert isinstance(slider, widgets.SelectionSlider) and isinstance(stack, widgets.Stack)
    assert slider.index == stack.selected_index == 2
    assert [bytes(im.value) for im in stack.children] == list(views.values())
    state = embed_data(views=[box])["manager_state"]["state"]
    link = [m["state"] for m in state.values() if m["model_name"] == "LinkModel"]
    assert {"source": [f"IPY_MODEL_{slider.model_id}", "index"],
            "target": [f"IPY_MODEL_{stack.model_id}", "selected_index"]} in [
        {"source": s["source"], "target": s["target"]} for s in link]
    assert "kdbook-slider" in state[slider.model_id]["state"]["_dom_classes"]
    assert "kdbook-stack" in state[stack.model_id]["state"]["_dom_classes"]


def test_slider_stack_embeds_in_standalone_html(tmp_path):
    box = slider_stack({1: _fig(1), 2: _fig(2)}, description="λ")
    out = tmp_path / "w.html"
    embed_minimal_html(out, views=[box], title="t")
    text = out.read_text()
    assert "application/vnd.jupyter.widget-state+json" in text and "LinkModel" in text and "StackModel" in text


@pytest.mark.parametrize("views,kwargs,message", [
    ({}, {}, "non-empty"), ({1: "x"}, {}, "PNG bytes"), ({1: b"\x89PNG"}, dict(initial=7), "unknown initial slider value 7; choose one of 1")])
def test_slider_stack_rejects_bad_input(views, kwargs, message):
    with pytest.raises(ValueError, match=message):
        slider_stack(views, **kwargs)


def test_slider_live_recomputes():
    calls = []

    def render(v):
        calls.append(v)
        return _fig(v)

    box = slider_live(render, [1, 2, 3], description="τ")
    box.children[0].value = 3
    assert calls == [1, 3]


def test_discrepancy_table_computes_difference_and_handles_missing():
    rows = [dict(quantity="agreement", paper=84.5, ours_mean=86.0, ours_std=0.25, n=3, unit="%", verdict="ok", reason="r"),
            dict(quantity="range", paper="84–86", ours_mean=85.0, ours_std=1.0, n=5, unit="%", verdict="", reason=""),
            dict(quantity="none", paper=None, ours_mean=0.5, ours_std=None, n=None, unit="nats"),
            dict(quantity="kl", paper=0.0, ours_mean=-0.25, ours_std=0.0, n=2)]
    html = discrepancy_rows_html(rows)
    assert "+1.50 pp" in html and "86.00% ± 0.25% (n = 3)" in html
    assert "84–86" in html and "-0.250" in html and "0.500 nats" in html
    assert html.count("<tr>") == 5 and html.count("–") >= 3
    assert discrepancy_table(rows).data == html
    with pytest.raises(ValueError, match="lacks"):
        discrepancy_rows_html([dict(quantity="q", paper=1.0)])


def test_discrepancy_table_at_smoke_shows_every_row_with_the_paper_value_and_no_number_of_ours():
    rows = [dict(quantity=f"q{i}", paper=1.0 + i, ours_mean=0.5, ours_std=0.1, n=3, verdict="not comparable (smoke)")
            for i in range(25)]
    html = discrepancy_rows_html(rows, profile="smoke")
    body = html.split("<tbody>")[1]
    assert body.count("<tr") == 25 and "0.500" not in html and "n = 3" not in html
    for i in range(25):  # each row: its quantity, the paper's value, "—" for ours, flagged as smoke
        assert f"<td>q{i}</td><td>{1.0 + i:.3f}</td><td>— (smoke)</td>" in body, i
    assert body.count(SMOKE_LINE) == 25 and body.count('class="kdbook-smoke"') == 25
    assert discrepancy_table(rows, profile="smoke").data == html
    # other profiles, or an explicit collapse=False (identities that hold at any profile), keep every row
    assert discrepancy_rows_html(rows, profile="quick").count("<tr>") == 26
    assert discrepancy_rows_html(rows, profile="smoke", collapse=False).count("<tr>") == 26
    assert discrepancy_rows_html(rows).count("<tr>") == 26  # the old call signature: no profile, no collapse


def test_discrepancy_table_reference_column_caption_and_counts():
    rows = [dict(quantity="train images", paper=60000, ours_mean=60000, ours_std=0.0, n=1),
            dict(quantity="mean (R)", paper=0.5071, ours_mean=0.5070, ours_std=0.0, n=1)]
    html = discrepancy_rows_html(rows, reference="torchvision statistics", profile="quick", device="cpu: x86_64")
    assert "<th>torchvision statistics</th>" in html and "<th>paper</th>" not in html
    assert "<caption>" in html and "profile quick" in html and "cpu: x86_64" in html
    assert "60,000 (n = 1)" in html and "60000.000" not in html and "± 0.000" not in html
    assert "<th>paper</th>" in discrepancy_rows_html(rows)  # default header unchanged for the other chapters


def test_mean_std_is_the_sample_std():
    mean, std, n = mean_std([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and abs(std - 1.2909944487) < 1e-9  # ddof = 1, not 1.118 (ddof = 0)
    assert mean_std([7.0]) == (7.0, None, 1)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    html = discrepancy_rows_html([dict(quantity="acc", paper=None, values=[1.0, 2.0, 3.0, 4.0], unit="%")])
    assert "2.50% ± 1.29% (n = 4)" in html


def test_plot_curve_with_band_draws_paper_values():
    fig, ax = plt.subplots()
    plot_curve_with_band(ax, [1, 2, 3], [0.1, 0.2, 0.3], [0.01, 0.02, 0.03], paper_x=[1, 3], paper_y=[0.15, 0.35])
    assert len(ax.lines) == 2 and len(ax.collections) == 1
    assert list(ax.lines[1].get_ydata()) == [0.15, 0.35] and ax.lines[1].get_linestyle() == "--"
    with pytest.raises(ValueError, match="both"):
        plot_curve_with_band(ax, [1], [1], paper_y=[1])
    plt.close(fig)


def test_provenance_lines_never_show_a_missing_profile_as_a_profile():
    recs = [dict(params=dict(profile="quick"), meta=dict(device="cpu: x86_64 (1 threads)")) for _ in range(3)]
    assert records_provenance(recs, "3 trials") == "profile quick · computed on cpu: x86_64 (1 threads) · n = 3 trials"
    mixed = records_provenance(recs + [dict(params=dict(seed=0), meta=dict(device="cpu: x86_64 (1 threads)"))])
    assert "profile quick (1 of 4 records name no profile)" in mixed and "None" not in mixed
    assert records_provenance([dict(params={}, meta={})]) == "profile not recorded · computed on an unrecorded device"
    assert "pipeline check only" in records_provenance([dict(params=dict(profile="smoke"), meta=dict(device="cpu"))])
    with pytest.raises(ValueError, match="profile and the device"):
        provenance("quick", "")


def test_panel_grid_keeps_at_most_two_panels_a_row():
    fig, axes = panel_grid(5)
    assert len(axes) == len(fig.axes) == 5 and tuple(fig.get_size_inches()) == (7.2, 9.0)
    plt.close(fig)
    fig, axes = panel_grid(3, max_cols=1, panel_size=(5.0, 3.0))
    assert tuple(fig.get_size_inches()) == (5.0, 9.0)
    plt.close(fig)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        panel_grid(0)
