"""The API reference (api/*.md, written by tools/api_pages.py from the code) is current, complete and in the book;
every module of kdbook opens with a docstring that says what it provides."""
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from api_pages import LIBRARY, module_names, module_page, modules, page_name, pages, toc_text  # noqa: E402

MODULES = module_names(REPO)  # "losses", ..., "experiments.synthetic", ...


@pytest.fixture(scope="module")
def generated():
    return pages(REPO)


def test_pages_are_current(generated):
    have = {p.name: p.read_text() for p in (REPO / "api").glob("*.md")}
    stale = sorted(n for n in set(generated) | set(have) if generated.get(n) != have.get(n))
    assert not stale, f"api/ is stale ({', '.join(stale)}): run python tools/api_pages.py and commit api/"


def test_every_public_name_has_its_entry(generated):
    missing = []
    for name in MODULES:
        page = generated.get(f"{page_name(name)}.md")
        if page is None:
            missing.append(f"kdbook.{name} (no page)")
            continue
        headings = set(re.findall(r"^##+ (\S+)$", page, flags=re.M))
        missing += [f"kdbook.{name}.{sym}" for sym in importlib.import_module(f"kdbook.{name}").__all__
                    if sym not in headings]
    assert not missing, f"public names missing from the API reference: {missing}"


def test_library_first_then_experiments_and_all_in_the_toc():
    library, experiments = modules(REPO)
    assert library == [m for m in LIBRARY if m in MODULES] and set(library) | set(experiments) == set(MODULES)
    assert {"losses", "metrics", "store", "train"} <= set(library) and not set(library) & set(experiments)
    assert all(m.startswith("experiments.") for m in experiments), "experiment modules live in kdbook.experiments"
    entries = re.findall(r"file: (api/\w+)", (REPO / "_toc.yml").read_text())
    want = ["api/index", *(f"api/{page_name(m)}" for m in library), "api/experiments",
            *(f"api/{page_name(m)}" for m in experiments)]
    assert entries == want, "_toc.yml's API part must list api/index, the library, api/experiments, the experiment modules"
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    assert toc["parts"][-1]["chapters"][0]["file"] == "chapters/use_kdbook", "the usage page opens the last part"


def test_the_generator_writes_the_toc_entries():
    toc = (REPO / "_toc.yml").read_text()
    assert toc_text(REPO, toc) == toc, "run python tools/api_pages.py: _toc.yml's API entries are stale"
    bare = re.sub(r"\n +(sections:|- file: api/(?!index)\w+)(?=\n)", "", toc)
    assert bare != toc and toc_text(REPO, bare) == toc
    with pytest.raises(ValueError, match="api/index"):
        toc_text(REPO, "format: jb-book\n")


def test_a_new_public_name_makes_the_check_fail(generated, monkeypatch):
    import kdbook.losses as losses
    monkeypatch.setattr(losses, "__all__", [*losses.__all__, "not_documented_yet"])
    monkeypatch.setattr(losses, "not_documented_yet", lambda x: x, raising=False)
    page = module_page(REPO, "losses")
    assert page != generated["losses.md"] and "## not_documented_yet" in page


QUOTE = ('"', "'", "“", "‘", "*", ">", "«")
CLAIM = re.compile(r"the paper finds|the paper's claim|the paper claims|tested here", re.I)


def docstring_problem(text: str | None) -> str | None:
    "Why a module docstring does not say what the module provides, or None."
    if not text or not text.strip():
        return "no module docstring (the `> ...` line under the chapter's title becomes it)"
    text = text.strip()
    if text.startswith(QUOTE):
        return f"starts with a quotation mark or emphasis ({text[:40]!r}...): quote the paper in '## The claim', not here"
    if CLAIM.search(text):
        return f"states the paper's claim ({CLAIM.search(text).group(0)!r}): say what the module provides"
    if re.search(r"\d\s?%", text):
        return "quotes results (a percentage): say what the module provides; results belong in the chapter"
    if len(text.split()) < 6:
        return f"too short to say what the module provides: {text!r}"
    return None


def test_docstring_problem_detects_each_case():
    assert docstring_problem(None) and docstring_problem("  ")
    assert docstring_problem('"Knowledge distillation does not work", the paper says.')
    assert docstring_problem("*Teachers (CIFAR-100): 200 epochs*")
    assert docstring_problem("The paper's claim (§6.2), tested here: train agreement is low.")
    assert docstring_problem("Plots.")
    assert docstring_problem("Recycling: the best agreement is still only about 85% (Figure 4).")
    assert docstring_problem("The KD loss of Eq. 1 (kd_loss), the ensemble teacher's logits and the KD gradient.") is None


@pytest.mark.parametrize("name", MODULES)  # one test per module: every offender is reported in one run
def test_module_docstring_says_what_it_provides(name):
    text = (REPO / "kdbook" / f"{name.replace('.', '/')}.py").read_text()
    problem = docstring_problem(importlib.import_module(f"kdbook.{name}").__doc__)
    assert problem is None, f"kdbook/{name}.py: {problem}"
    assert text.lstrip().startswith('"""'), f"kdbook/{name}.py: the docstring must open the file"
