"""The notebooks' markdown renders as a lesson, not as a wall of headings.

Each markdown cell is rendered on its own, as Jupyter does, with a CommonMark
renderer (markdown-it-py) with tables on and ``$...$`` / ``$$...$$`` kept apart
from the markdown as math (Jupyter hands those spans to MathJax untouched).
Checks: one level-1 heading per notebook (its title, in the first cell), sections
as level-2 headings, every table in the source comes out as a ``<table>``, every
formula comes out as a math element holding the same TeX, no cell has the ``# ``
line prefix left from a script format, and each notebook ends with a recap and
exercises.
"""
import html
import re
from pathlib import Path

import nbformat
import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RENDER = MarkdownIt("commonmark").enable("table").use(dollarmath_plugin)

# a table's delimiter row, also behind a stray "# " (which keeps it from rendering as a table)
TABLE_RULE = re.compile(r"^[#\s]*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
BLOCK_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE_MATH = re.compile(r"\$([^$\n]+?)\$")
MATH_OUT = re.compile(r'<(?:span|div) class="math (?:inline|block)">(.*?)</(?:span|div)>', re.S)


def _markdown(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


def _formulas(source: str) -> list[str]:
    """The TeX of every $$...$$ and $...$ span outside code, in order of kind."""
    text = CODE.sub("", source)
    blocks = [m.strip() for m in BLOCK_MATH.findall(text)]
    inline = [m.strip() for m in INLINE_MATH.findall(BLOCK_MATH.sub("", text))]
    return blocks + inline


def _headings(rendered: str) -> list[tuple[int, str]]:
    return [(int(level), re.sub(r"<[^>]+>", "", text).strip())
            for level, text in re.findall(r"<h([1-6])>(.*?)</h\1>", rendered, re.S)]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_keeps_the_script_comment_prefix(nb_path):
    for i, src in enumerate(_markdown(nb_path)):
        lines = [line for line in src.splitlines() if line.strip()]
        assert not (lines and all(line == "#" or line.startswith("# ") for line in lines)), \
            f"{nb_path.name}, markdown cell {i}: every line starts with '# ' (a script-format leftover)"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_headings_are_one_title_and_sections(nb_path):
    cells = [RENDER.render(src) for src in _markdown(nb_path)]
    headings = [(i, level, text) for i, out in enumerate(cells) for level, text in _headings(out)]
    titles = [(i, text) for i, level, text in headings if level == 1]
    assert len(titles) == 1, f"{nb_path.name}: one level-1 heading (the title), found {titles}"
    assert titles[0][0] == 0, f"{nb_path.name}: the title is in the first cell"
    assert titles[0][1].startswith(nb_path.stem[:2] + " · "), f"{nb_path.name}: title {titles[0][1]!r}"
    levels = [level for _, level, _ in headings]
    assert levels.count(2) >= 3, f"{nb_path.name}: sections are level-2 headings"
    for before, after in zip(levels, levels[1:]):
        assert after <= before + 1, f"{nb_path.name}: a heading level skipped ({before} -> {after})"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_table_renders_as_a_table(nb_path):
    for i, src in enumerate(_markdown(nb_path)):
        in_source = sum(bool(TABLE_RULE.match(line)) for line in CODE.sub("", src).splitlines())
        rendered = RENDER.render(src)
        assert rendered.count("<table>") == in_source, \
            f"{nb_path.name}, markdown cell {i}: {in_source} table(s) in the source, " \
            f"{rendered.count('<table>')} rendered"
        for table in re.findall(r"<table>.*?</table>", rendered, re.S):
            header = len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
            rows = re.findall(r"<tr>(.*?)</tr>", table.split("</thead>")[1], re.S)
            assert rows and all(len(re.findall(r"<td[ >]", r)) == header for r in rows), \
                f"{nb_path.name}, markdown cell {i}: a table row with the wrong number of cells"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_formulas_reach_mathjax_intact(nb_path):
    for i, src in enumerate(_markdown(nb_path)):
        expected = _formulas(src)
        rendered = [html.unescape(m).strip() for m in MATH_OUT.findall(RENDER.render(src))]
        assert sorted(rendered) == sorted(expected), \
            f"{nb_path.name}, markdown cell {i}: formulas {expected} came out as {rendered}"


def test_the_course_has_tables_and_formulas():
    """The two checks above are not vacuous."""
    sources = [src for nb in NOTEBOOKS for src in _markdown(nb)]
    assert sum("<table>" in RENDER.render(s) for s in sources) >= 4
    assert sum(len(_formulas(s)) for s in sources) >= 5
    lora = next(nb for nb in NOTEBOOKS if nb.stem.startswith("03"))
    assert r"W' = W + \frac{\alpha}{r}\, B A" in [f for s in _markdown(lora) for f in _formulas(s)]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_ends_with_a_recap_and_exercises(nb_path):
    cells = [RENDER.render(src) for src in _markdown(nb_path)]
    recap, exercises = cells[-2], cells[-1]
    assert _headings(recap)[:1] == [(2, "Recap")], f"{nb_path.name}: second-last markdown cell is '## Recap'"
    assert len(re.sub(r"<[^>]+>", "", recap).split()) >= 25, f"{nb_path.name}: the recap says what was seen"
    assert _headings(exercises)[:1] == [(2, "Exercises")], f"{nb_path.name}: last markdown cell is '## Exercises'"
    n = exercises.count("<li>")
    assert 2 <= n <= 3, f"{nb_path.name}: two or three exercises, found {n}"
