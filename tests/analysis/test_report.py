"""HTML report: summary numbers from metrics dicts, embedded figures, captions, escaping."""

import base64
import html
import re
import struct
import zlib

import pytest

from libmoe.analysis.plots import FigureInfo
from libmoe.analysis.report import summary_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG, so the report tests need no matplotlib."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def smoe():
    return {
        "algorithm": "smoe", "step": 900,
        "eae": {"0": 0.9, "1": 0.8, "2": 0.7},
        "ewa": {"0": 0.61, "1": 0.62, "2": 0.66},
        "router_margin": {"0": 0.1, "1": None, "2": 0.3},
        "expert_change_rate": [{"from": 300, "to": 600, "mean": 0.4}, {"from": 600, "to": 900, "mean": 0.25}],
        "router_saturation": [{"step": 300, "topk": 0.55, "top1": 0.4}, {"step": 900, "topk": 1.0}],
        "load": {"0": {"jain": 0.9, "dead": 1}, "1": {"jain": 0.8, "dead": 0}, "2": {"jain": 0.7, "dead": 2}},
        "droptop": {"runs": [{"name": "DropTop1", "drop_top": 1, "delta": {"val_ppl": 12.5}},
                             {"name": "DropTop1&2", "drop_top": 2, "delta": {"val_ppl": 40.25}}]},
        "temperature": {"runs": [{"name": "tau=0.1", "tau": 0.1, "delta": {"val_ppl": 0.5}},
                                 {"name": "tau=10", "tau": 10, "delta": {"val_ppl": 30.0}}]},
        "skipped": {"layer_overlap": "single MoE layer"},
    }


def dense():
    return {"algorithm": "dense", "step": 900, "eae": {}, "ewa": {}, "router_margin": {},
            "expert_change_rate": [], "router_saturation": [], "load": {}, "droptop": {},
            "skipped": {"droptop": "dense model: no router"}}


def row_of(page, name):
    """The cell texts of the summary-table row whose first cell is name (escaped)."""
    for tr in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name}")


def test_summary_rows_compute_layer_means_and_interventions():
    smoe_row, dense_row = summary_rows({"smoe": smoe(), "dense": dense()})
    assert smoe_row["eae"] == pytest.approx(0.8)
    assert smoe_row["margin"] == pytest.approx(0.2)  # the null layer is left out
    assert smoe_row["change_rate"] == 0.25 and smoe_row["saturation"] == 0.55
    assert smoe_row["jain"] == pytest.approx(0.8) and smoe_row["dead"] == 3
    assert (smoe_row["droptop1"], smoe_row["droptop12"]) == (12.5, 40.25)
    assert (smoe_row["tau10"], smoe_row["tau01"]) == (30.0, 0.5)
    assert dense_row["run"] == "dense" and dense_row["step"] == 900
    assert all(dense_row[k] is None for k in ("eae", "margin", "change_rate", "jain", "dead", "droptop1"))


def test_report_embeds_figures_captions_and_summary(tmp_path):
    figures = [FigureInfo("a.png", "Alpha figure", "Read alpha & beta <carefully>."),
               FigureInfo("b.png", "Beta figure", "Second caption.")]
    for f in figures:
        (tmp_path / f.name).write_bytes(tiny_png())
    runs = {"smoe": smoe(), "<b>x": dense()}
    out = write_report(tmp_path / "r" / "report.html", runs, figures, tmp_path, notes=["tasks not traced"])
    page = out.read_text(encoding="utf-8")

    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 2 and all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for f in figures:
        assert html.escape(f.caption) in page and html.escape(f.title) in page
    assert "<b>x" not in page and "&lt;b&gt;x" in page

    cells = row_of(page, "smoe")
    # run, algorithm, step, EAE, EWA, margin, change rate, saturation, Jain, dead, 4 x Δval_ppl
    assert cells == ["smoe", "smoe", "900", "0.800", "0.630", "0.200", "0.250", "0.550", "0.800", "3",
                     "+12.50", "+40.25", "+30.00", "+0.50"]
    dense_cells = row_of(page, "<b>x")
    assert dense_cells[:3] == ["<b>x", "dense", "900"] and set(dense_cells[3:]) == {"–"}
    assert "tasks not traced" in page
    assert "smoe: layer_overlap skipped: single MoE layer" in page
    assert html.escape("<b>x: droptop skipped: dense model: no router") in page


def test_report_leaves_out_columns_no_run_has(tmp_path):
    page = write_report(tmp_path / "r.html", {"dense": dense()}, [], tmp_path).read_text(encoding="utf-8")
    assert "Final step" in page and "<th>EAE</th>" not in page and "<th>DropTop1" not in page


def test_missing_figure_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report(tmp_path / "r.html", {}, [FigureInfo("nope.png", "t", "c")], tmp_path)


def test_report_from_plot_all(tmp_path):
    pytest.importorskip("matplotlib")
    from libmoe.analysis.plots import plot_all

    runs = {"smoe": smoe(), "dense": dense()}
    figures = plot_all(runs, tmp_path / "figs")
    assert [f.name for f in figures] == ["change_rate.png", "saturation.png", "ewa_by_layer.png",
                                         "margin_by_depth.png", "droptop.png", "temperature.png"]
    page = write_report(tmp_path / "report.html", runs, figures, tmp_path / "figs").read_text("utf-8")
    assert page.count("data:image/png;base64,") == len(figures)
