"""The style figures (tools/style_metrics.py) are measured on every CI run and printed; their counting is checked
on small cells whose figures are known."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("style_metrics", REPO / "tools" / "style_metrics.py")
sm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sm)


def _nb(tmp_path, cells):
    path = tmp_path / "99_toy.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def _code(src, tags=None):
    return {"cell_type": "code", "source": src, "metadata": {"tags": tags or []}, "outputs": []}


def test_counts_on_a_known_notebook(tmp_path):
    nb = _nb(tmp_path, [
        {"cell_type": "markdown", "source": "# Title\n\nFour words of prose `not_counted`.", "metadata": {}},
        _code("#| export\nX_MAX = 3\n\ndef f(x):\n    return x + 1\n"),   # 3 lines, 2 definitions
        _code("#| hide\nimport os\nprint(os.sep)\n"),                      # not visible
        _code("f(1)\n", tags=["hide-input"]),                              # not visible
        _code("y = f(2)\n"),                                               # 6 tokens: y = f ( 2 )
    ])
    m = sm.chapter_metrics(nb)
    assert m["exported_cells"] == 1 and m["mean_exported_lines"] == 3.0 and m["max_exported_lines"] == 3
    assert m["definitions_per_exported_cell"] == 2.0
    assert m["prose_words"] == 5  # "Title", "Four", "words", "of", "prose"
    # visible: the exported cell (X_MAX = 3 / def f ( x ) : return x + 1 -> 13 tokens) and "y = f(2)" (6)
    assert m["visible_code_tokens"] == 13 + 6


def test_prose_words_count_captions_not_code_fences():
    md = ("See {numref}`fig-x` for it.\n\n"
          "```{glue:figure} fig_x\n:name: fig-x\n\n**Bold title.** Caption with `code` and $x^2$.\n```\n\n"
          "```python\nnot = prose + at_all\n```\n\n$$\ny = mx\n$$\nEnd.")
    # "See for it" (3) + "Bold title Caption with and" (5) + "End" (1): no role, option, code, math or fenced code
    assert sm.prose_words(md) == 9
    assert sm.prose_words("```{code-cell} python\nprint(1)\n```\nTwo words") == 2


def test_package_raise_assert_density(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f(x):\n    assert x\n    if x < 0:\n        raise ValueError(x)\n    return x\n")
    p = sm.package_metrics(pkg)
    assert p == {"lines": 5, "raise_assert": 2, "raise_assert_per_kloc": 400.0}


def test_the_book_is_measured_and_printed(capsys):
    m = sm.measure(REPO)
    stems = {c["chapter"] for c in m["chapters"]}
    assert {p.stem for p in (REPO / "chapters").glob("*.ipynb")} == stems
    print(sm.report(m))  # the figures, in the CI log (pytest -v shows captured output of failures only: -s to see)
    assert "raise/assert" in capsys.readouterr().out
