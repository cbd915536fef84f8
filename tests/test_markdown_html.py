"""The reports' one markdown -> HTML renderer."""

from __future__ import annotations

import base64

from tunelab.experiments import markdown_html


def test_headings_lists_tables_emphasis_and_images_render():
    markdown = "\n".join([
        "# Report <1>", "", "Some **bold** and *italic* text.", "- first", "- second", "",
        "| method | score |", "|---|---:|", "| lora | **0.58** |", "| full | 0.90 |", "",
        "![pareto](plots/pareto.png)", "![missing](plots/missing.png)",
    ])
    out = markdown_html.to_html(markdown, {"pareto": b"PNG", "missing": None})
    assert out.startswith("<h1>Report &lt;1&gt;</h1>")
    assert "<p>Some <b>bold</b> and <i>italic</i> text.</p>" in out
    assert "<ul><li>first</li><li>second</li></ul>" in out
    assert "<table><tr><th>method</th><th>score</th></tr><tr><td>lora</td><td><b>0.58</b></td></tr>" in out
    assert "---" not in out  # the separator row is dropped
    assert f'src="data:image/png;base64,{base64.b64encode(b"PNG").decode()}"' in out
    assert "missing" not in out


def test_a_list_right_before_a_table_closes_first():
    out = markdown_html.to_html("- a\n| x |\n|---|\n| 1 |")
    assert out == "<ul><li>a</li></ul><table><tr><th>x</th></tr><tr><td>1</td></tr></table>"


def test_page_wraps_and_escapes_the_title():
    page = markdown_html.page("tune: <x>", "<p>b</p>")
    assert page.startswith("<!doctype html>") and "<title>tune: &lt;x&gt;</title>" in page
    assert page.rstrip().endswith("<p>b</p></body></html>")
