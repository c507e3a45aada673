"""Hostile or mistaken configuration is refused with a message that names the problem, before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import HyperNetParams, JobParams
from brats_fl.site.config import ENV_VAR, resolve


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rounds": 0}, "rounds >= 1, got 0"),
        ({"patch_size": (60, 64, 64)}, "patch sizes multiples of 8"),
        ({"lr": -0.1}, "0 < lr < 1"),
        ({"fg_ratio": 1.5}, "0 < fg_ratio <= 1"),
        ({"transfer": "half"}, "transfer full or diff"),
        ({"order": "random"}, "order one of"),
        ({"visit_timeout": 0}, "positive assignment and visit timeouts"),
        ({"hypernetwork": HyperNetParams(warmup_rounds=20)}, "warmup_rounds < rounds"),
    ],
)
def test_job_parameter_out_of_range_is_refused(params: dict, message: str):
    with pytest.raises(ValueError, match=message):
        JobParams(**params)


def test_cli_refuses_a_bad_parameter_before_running(capsys):
    assert main(["run", "brats_fedavg", "--local-epochs", "0"]) == 2
    assert "local_epochs >= 1, got 0" in capsys.readouterr().err


def test_unknown_site_is_named_with_the_sites_there_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "lists").mkdir()
    for site in ("site-1", "site-2"):
        (tmp_path / "lists" / f"{site}.json").write_text("{}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_root": str(tmp_path), "datalist_dir": "lists"}))
    monkeypatch.setenv(ENV_VAR, str(config))
    assert resolve("site-2").datalist == tmp_path / "lists" / "site-2.json"
    with pytest.raises(FileNotFoundError, match=r"no datalist for site-9 .*\['site-1', 'site-2'\]"):
        resolve("site-9")
