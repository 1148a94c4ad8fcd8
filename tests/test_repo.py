"""Repository invariants: kdbook/ is what nbdev-export makes of the chapters, chapters are committed
clean, the toc and chapters/ agree; plus fast checks of the build's notebook post-processing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from build_book import postprocess, toc_files  # noqa: E402
from colab_cell import (check as check_colab_cells, colab_source, follow_published_profile, is_colab_cell,  # noqa: E402
                        published_profile, repository_url, TAGS)

CHAPTERS = sorted((REPO / "chapters").glob("*.ipynb"))


def _toc_entries():
    import yaml
    return toc_files(yaml.safe_load((REPO / "_toc.yml").read_text()))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.py"))
            if "__pycache__" not in p.parts}


def test_nbdev_export_changes_nothing(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "chapters", tmp_path / "chapters")
    shutil.copytree(REPO / "kdbook", tmp_path / "kdbook", ignore=shutil.ignore_patterns("__pycache__"))
    exe = Path(sys.executable).parent / "nbdev-export"
    proc = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = _snapshot(REPO / "kdbook"), _snapshot(tmp_path / "kdbook")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"nbdev-export would change kdbook/{changed}: run nbdev-export and commit the result"


def test_chapters_exist():
    assert CHAPTERS, "no chapter notebooks in chapters/"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_committed_clean(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{nb_path.name}: cells {dirty} have outputs or execution counts; run nbdev-clean"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_parameters_and_colab_cell(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "profile" in params[0].source, f"{nb_path.name}: one `parameters` cell with profile"
    assert any(is_colab_cell(c) for c in nb.cells[:3]), \
        f"{nb_path.name}: no hidden Colab install cell (#| hide, tag remove-cell) among the first cells"


def test_colab_cells_and_launch_links_use_the_one_repository_address(tmp_path):
    """The repository address is written once, in _config.yml (repository.url, which Jupyter Book's Colab
    launch links are built from); every chapter's Colab cell is generated from it and names its chapter."""
    import yaml
    url = repository_url(REPO)
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert not check_colab_cells(CHAPTERS), "stale Colab cells: run python tools/colab_cell.py --write"
    for nb_path in CHAPTERS:
        cell = next(c for c in nbformat.read(nb_path, as_version=4).cells[:3] if is_colab_cell(c))
        assert f"git clone -q --depth 1 {url} " in cell.source and f'"{nb_path.stem}")' in cell.source
    # the address appears nowhere else in the sources: change it in _config.yml and the cells follow
    others = [p for p in list((REPO / "tools").glob("*.py")) + list((REPO / "chapters").glob("*.md"))
              if url in p.read_text()]
    assert not others, f"the repository address is written outside _config.yml in {others}"
    # a changed address makes every cell stale, so the check catches an edit of one place only
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/else\n")
    assert check_colab_cells(CHAPTERS[:1], root=tmp_path) == [str(CHAPTERS[0])]
    (tmp_path / "_config.yml").write_text("repository:\n  url: not a url\n")
    with pytest.raises(ValueError, match="repository.url"):
        repository_url(tmp_path)


class _Events:
    def __init__(self):
        self.hooks = []

    def register(self, name, fn):
        self.hooks.append(fn)

    def unregister(self, name, fn):
        self.hooks.remove(fn)


def _run(ip, source, **assign):
    from types import SimpleNamespace
    ip.user_ns.update(assign)
    for fn in list(ip.events.hooks):
        fn(SimpleNamespace(info=SimpleNamespace(raw_cell=source)))


def test_colab_runs_the_chapter_at_its_published_profile(tmp_path, capsys):
    from types import SimpleNamespace
    (tmp_path / "profiles.yml").write_text("default: smoke\nchapters: {21_mnist: quick}\n")
    assert published_profile(tmp_path, "21_mnist") == "quick" and published_profile(tmp_path, "a3_training") == "smoke"
    # the parameters cell runs with its committed "smoke": the published profile replaces it, once
    ip = SimpleNamespace(events=_Events(), user_ns={})
    assert follow_published_profile(ip, tmp_path, "21_mnist") == "quick"
    _run(ip, "#| hide\nimport sys")  # cells before the parameters cell change nothing
    assert "profile" not in ip.user_ns and len(ip.events.hooks) == 1
    _run(ip, 'profile = "smoke"  # smoke | quick | paper\nseed = 0', profile="smoke")
    assert ip.user_ns["profile"] == "quick" and not ip.events.hooks and "publishes this chapter" in capsys.readouterr().out
    _run(ip, 'profile = "smoke"', profile="smoke")  # re-running the parameters cell: what it says wins
    assert ip.user_ns["profile"] == "smoke"
    # a reader who edited the parameters cell keeps their choice
    ip = SimpleNamespace(events=_Events(), user_ns={})
    follow_published_profile(ip, tmp_path, "21_mnist")
    _run(ip, 'profile = "paper"', profile="paper")
    assert ip.user_ns["profile"] == "paper"
    # a chapter published at smoke installs no hook at all
    ip = SimpleNamespace(events=_Events(), user_ns={})
    follow_published_profile(ip, tmp_path, "a3_training")
    assert not ip.events.hooks
    # the repository's own profiles.yml is what the cell reads on Colab
    assert published_profile(REPO, "21_mnist") in ("smoke", "quick", "paper")


def _coverage_rows():
    text = (REPO / "chapters" / "00_preface.md").read_text()
    head = "| paper | what it shows | chapter | published at | status |"
    assert head in text, "the preface lost its coverage table"
    lines = text[text.index(head):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_preface_coverage_table_matches_profiles_and_store():
    """The preface's coverage table names every figure and table of the paper, every chapter of the toc, and
    the profile profiles.yml publishes each chapter at; its claim about GPU runs matches the store."""
    import json
    import re
    from build_book import chapter_profiles
    rows = _coverage_rows()
    papers = " ".join(r[0] for r in rows)
    for n in range(1, 15):
        assert re.search(rf"Fig\. {n}[a-c]?\b", papers), f"coverage table lacks Fig. {n}"
    for n in (1, 2):
        assert f"Table {n}" in papers, f"coverage table lacks Table {n}"
    published = chapter_profiles(REPO, None)
    stems = {Path(e).stem for e in _toc_entries() if e.startswith("chapters/") and not e.endswith("00_preface")}
    seen = set()
    for paper, _, chapter, at, status in rows:
        named = set(re.findall(r"`(\w+)`", chapter)) & stems
        if chapter.startswith("–"):  # built in a chapter, but the figure itself is not reproduced yet
            assert at == "–" and status.startswith(("owed", "not planned")), paper
            continue
        assert named, f"{paper}: no chapter named in {chapter!r}"
        for stem in named:
            assert published(stem) == at, f"{paper}: the preface says {stem} is published at {at}, profiles.yml says {published(stem)}"
            assert status.startswith(at), f"{paper}: status {status!r} does not start with the published profile {at}"
        seen |= named
    assert stems <= seen | {"a4_figures", "a5_checks"}, f"chapters missing from the coverage table: {sorted(stems - seen - {'a4_figures', 'a5_checks'})}"
    devices = [json.loads(p.read_text()).get("meta", {}).get("device", "") for p in (REPO / "results").rglob("*.json")]
    text = (REPO / "chapters" / "00_preface.md").read_text()
    if "no GPU run is in this edition" in text:
        assert not any(d.startswith("cuda") for d in devices), "the store has GPU records: update the preface"


def _device_records() -> list[str]:
    "The device of every record of the store (benchmarks included), as the record names it."
    import json
    found = []
    for p in (REPO / "results").rglob("*.json"):
        try:
            data = json.loads(p.read_text())
        except ValueError:
            continue
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        top = data if isinstance(data, dict) else {}
        found.append(" ".join(str(v) for v in (meta.get("device"), top.get("device_name"), top.get("device")) if v))
    return found


GPU_NAMES = ("H100", "H200", "A100", "V100", "A10G", "L4", "T4", "RTX")


def test_the_reader_is_told_one_provenance_story():
    """What the preface and the chapters published at `quick` say about where numbers come from agrees with the
    store: no chapter published at quick calls its runs owed, and the preface cites no GPU model that no stored
    record names."""
    import re
    from build_book import chapter_profiles
    published = chapter_profiles(REPO, None)
    # the Discussion reports the status of every other chapter ("owed" there is about their runs, not its own)
    owed = [nb.stem for nb in CHAPTERS if published(nb.stem) != "smoke" and nb.stem != "70_discussion"
            and re.search(r"\b(?:is|are|run is|runs are) owed\b", nb.read_text())]
    assert not owed, f"chapters published at quick or paper that call their runs owed: {owed}"
    devices = " ".join(_device_records())
    preface = (REPO / "chapters" / "00_preface.md").read_text()
    cited = {g for g in GPU_NAMES if re.search(rf"\b{g}\b", preface)}
    unrecorded = sorted(g for g in cited if g not in devices)
    assert not unrecorded, f"the preface cites {unrecorded} but no stored record was computed on one"


def test_every_toc_entry_exists():
    missing = [e for e in _toc_entries() if not any((REPO / (e + ext)).exists() for ext in ("", ".ipynb", ".md"))]
    assert not missing, f"_toc.yml names missing files: {missing}"


def test_every_chapter_is_in_the_toc():
    entries = {e.removesuffix(".ipynb").removesuffix(".md") for e in _toc_entries()}
    pages = sorted((REPO / "chapters").glob("*.ipynb")) + sorted((REPO / "chapters").glob("*.md"))
    orphans = [p.name for p in pages if f"chapters/{p.stem}" not in entries]
    assert not orphans, f"not in _toc.yml: {orphans}"


def _cell(src, tags=None, outputs=None):
    c = nbformat.v4.new_code_cell(src, metadata={"tags": tags} if tags else {})
    c.outputs = outputs or []
    return c


def test_postprocess_maps_directives_to_tags():
    md = nbformat.v4.new_output("display_data", data={"text/markdown": "---\n\n### f", "text/plain": "f"})
    keep = nbformat.v4.new_output("display_data", data={"text/markdown": "**bold**", "text/plain": "b"})
    nb = nbformat.v4.new_notebook(cells=[
        _cell("#| default_exp losses"),
        _cell(colab_source("https://github.com/o/r", "x"), tags=list(TAGS)),
        _cell("#| hide\nx = 1"),
        _cell("#|echo: false\nplot()"),
        _cell("#| export\ndef f(): pass"),
        _cell("#| output: false\ny = 2"),
        _cell("show_doc(f)", outputs=[md, keep]),
        nbformat.v4.new_markdown_cell("#| not a directive in markdown"),
    ])
    postprocess(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 6  # the default_exp-only cell is gone
    assert all("#|" not in c.source for c in code)
    assert code[0].metadata["tags"] == ["remove-cell"] and "google.colab" in code[0].source
    assert code[1].metadata["tags"] == ["remove-cell"] and code[1].source == "x = 1"
    assert code[2].metadata["tags"] == ["remove-input"]
    assert code[3].source == "def f(): pass" and "tags" not in code[3].metadata
    assert code[4].metadata["tags"] == ["remove-output"]
    assert code[5].outputs == [keep]


def test_published_profiles_name_real_chapters_and_profiles(tmp_path):
    """profiles.yml (what `make book` renders each chapter at) names toc chapters and known profiles;
    a bad profile there is a clear error, and --profile overrides it."""
    import yaml
    from build_book import BuildError, chapter_profiles
    spec = yaml.safe_load((REPO / "profiles.yml").read_text())
    stems = {Path(e).stem for e in _toc_entries()}
    assert set(spec.get("chapters") or {}) <= stems, "profiles.yml names a chapter that is not in _toc.yml"
    of = chapter_profiles(REPO, None)
    assert all(of(s) in ("smoke", "quick", "paper") for s in stems)
    assert chapter_profiles(REPO, "paper")("21_mnist") == "paper"
    (tmp_path / "profiles.yml").write_text("default: smoke\nchapters: {21_mnist: fast}\n")
    with pytest.raises(BuildError, match="unknown profile 'fast'"):
        chapter_profiles(tmp_path, None)
