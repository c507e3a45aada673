"""The generated reference pages (``docs/reference/generate.py``) are what the schema, the catalogue and the parser
say now: a parameter, job or option added without regenerating the pages fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "reference" / "generate.py"


@pytest.fixture(scope="module")
def generate():
    """The script as a module (``docs/`` is no installed package)."""
    spec = importlib.util.spec_from_file_location("generate_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["jobs.md", "cli.md"])
def test_committed_page_is_current(generate, name):
    committed = (SCRIPT.parent / name).read_text()
    assert committed == generate.PAGES[name](), f"docs/reference/{name} is stale: run python docs/reference/generate.py"


def test_pages_name_every_job_parameter_and_command(generate):
    from brats_fl.cli.main import build_parser
    from brats_fl.jobs.registry import JOBS
    from brats_fl.settings.params import HYPERNETWORK, PARAMS

    jobs, cli = generate.jobs_page(), generate.cli_page()
    assert all(f"| `{name}` |" in jobs for name in JOBS)
    for p in (*PARAMS, *HYPERNETWORK):
        assert f"| `{p.name}` | {f'`{p.flag}`' if p.flag else '(Python only)'} |" in jobs
    assert all(f"## brats-fl {name}\n" in cli for name in generate._subcommands(build_parser()))


def test_check_reports_a_stale_page(generate, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "HERE", tmp_path)
    (tmp_path / "jobs.md").write_text(generate.jobs_page().replace("brats_fedavg", "brats_fedavgx", 1))
    (tmp_path / "cli.md").write_text(generate.cli_page())
    assert generate.main(["--check"]) == 1
    assert "jobs.md differs" in capsys.readouterr().out
