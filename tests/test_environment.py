"""environment.yml (conda) installs exactly the versions pinned in requirements*.txt (pip)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import sync_environment as se  # noqa: E402


def test_every_requirement_is_pinned_in_environment_yml():
    req, env = se.requirement_pins(), se.environment_pins(REPO / "environment.yml")
    missing = {k: v for k, v in req.items() if k not in env}
    differ = {k: (v, env[k]) for k, v in req.items() if k in env and env[k] != v}
    assert not missing, f"in requirements but not environment.yml: {missing}; run tools/sync_environment.py"
    assert not differ, f"(requirements, environment.yml) disagree: {differ}; run tools/sync_environment.py"


def test_environment_yml_pins_nothing_else():
    req, env = se.requirement_pins(), se.environment_pins(REPO / "environment.yml")
    extra = {k: v for k, v in env.items() if k not in req}
    assert not extra, f"environment.yml pins {extra} that requirements*.txt do not; run tools/sync_environment.py"


def test_environment_yml_is_generated_output():
    assert (REPO / "environment.yml").read_text() == se.render(se.requirement_pins())


def test_python_version_and_unpinned_lines_are_rejected(tmp_path):
    import yaml
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    bad = tmp_path / "r.txt"
    bad.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="not pinned"):
        se.read_pins(bad)


def test_check_detects_a_disagreement(tmp_path, monkeypatch):
    (tmp_path / "requirements.txt").write_text("numpy==1.0\n")
    (tmp_path / "requirements-test.txt").write_text("-r requirements.txt\npytest==1.0\n")
    monkeypatch.setattr(se, "REPO", tmp_path)
    (tmp_path / "environment.yml").write_text(se.render({"numpy": "1.0", "pytest": "2.0"}))
    pins, env = se.requirement_pins(), se.environment_pins(tmp_path / "environment.yml")
    assert pins == {"numpy": "1.0", "pytest": "1.0"} and env["pytest"] == "2.0" and pins != env
