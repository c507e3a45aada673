"""Hostile or mistaken configuration is refused with a message that names the problem, before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import HyperNetParams, JobParams
from brats_fl.site.config import ENV_VAR, THREADS_VAR, SiteConfigError, resolve


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rounds": 0}, "rounds >= 1, got 0"),
        ({"patch_size": (60, 64, 64)}, "patch sizes multiples of 8"),
        ({"lr": -0.1}, "0 < lr < 1"),
        ({"fg_ratio": 1.5}, "0 < fg_ratio <= 1"),
        ({"transfer": "half"}, "transfer full or diff"),
        ({"order": "random"}, "order one of"),
        ({"visit_timeout": 0}, "visit_timeout > 0 .seconds."),
        ({"eval_timeout": -5}, "eval_timeout > 0 .seconds."),
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


@pytest.fixture
def site_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid configuration (data root, datalists of site-1 and site-All) named by the environment."""
    (tmp_path / "data" / "case").mkdir(parents=True)
    (tmp_path / "lists").mkdir()
    for name in ("site-1", "site-All"):
        (tmp_path / "lists" / f"{name}.json").write_text("{}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_root": "data", "datalist_dir": "lists"}))
    monkeypatch.setenv(ENV_VAR, str(config))
    monkeypatch.delenv(THREADS_VAR, raising=False)
    return config


@pytest.mark.parametrize(
    ("doc", "error", "message"),
    [
        (["data_root"], SiteConfigError, "expected an object of settings, got a list"),
        ({"data_root": "data", "datalist_dir": "lists", "root": "x"}, SiteConfigError, "unknown key(s) ['root']"),
        ({"data_root": "data", "datalist_dir": "lists", "sites": []}, SiteConfigError, "sites must be an object"),
        ({"data_root": "data", "datalist_dir": "lists", "sites": {"site-1": 3}}, SiteConfigError, "sites must be"),
        ({"data_root": "data", "datalist_dir": "lists", "sites": {"site-1": {"sites": {}}}}, SiteConfigError,
         "unknown key(s) ['sites'] for site-1"),
        ({"data_root": "data", "datalist_dir": "lists", "threads": "2"}, SiteConfigError,
         "threads must be a whole number >= 1, got '2'"),
        ({"data_root": "data", "datalist_dir": "lists", "threads": True}, SiteConfigError, "threads must be a whole"),
        ({"data_root": 5, "datalist_dir": "lists"}, SiteConfigError, "data_root must be a path (a non-empty string)"),
        ({"data_root": "data\0", "datalist_dir": "lists"}, SiteConfigError, "data_root must be a path"),
        ({"data_root": "data", "datalist": "x" * 5000}, SiteConfigError, "datalist 'xxx"),
        ({"datalist_dir": "lists"}, SiteConfigError, "no data_root for site-1"),
        ({"data_root": "data"}, SiteConfigError, "neither datalist nor datalist_dir for site-1"),
        ({"data_root": "nowhere", "datalist_dir": "lists"}, FileNotFoundError, "data_root"),
    ],
)  # fmt: skip
def test_bad_site_configuration_is_refused_naming_it(site_config: Path, doc, error: type, message: str):
    site_config.write_text(json.dumps(doc))
    with pytest.raises(error) as err:
        resolve("site-1")
    assert str(err.value).startswith(f"{site_config}: ") and message in str(err.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"data_root": "dat"}, "data_root {tmp}/dat of site-1 is not a folder; {tmp}, the nearest folder that exists, "
         "holds ['config.json', 'data', 'empty', 'lists']"),
        ({"data_root": "empty"}, "data_root {tmp}/empty of site-1 is empty"),
        ({"datalist_dir": "list/equal"}, "datalist_dir {tmp}/list/equal of site-1 is not a folder; {tmp}, the nearest "
         "folder that exists, holds ['config.json', 'data', 'empty', 'lists']"),
        ({"datalist_dir": "empty"}, "no datalist for site-1 in {tmp}/empty; it holds []"),
        ({"datalist": "lists/site-9.json"}, "datalist {tmp}/lists/site-9.json of site-1 is not a file; {tmp}/lists, "
         "the nearest folder that exists, holds ['site-1.json', 'site-All.json']"),
    ],
)  # fmt: skip
def test_missing_or_empty_data_names_the_site_the_path_and_what_is_there(site_config: Path, settings: dict, message):
    (site_config.parent / "empty").mkdir()
    # a site's own datalist file replaces the folder of datalists
    where = {} if "datalist" in settings else {"datalist_dir": "lists"}
    site_config.write_text(json.dumps({"data_root": "data"} | where | settings))
    with pytest.raises(FileNotFoundError) as err:
        resolve("site-1")
    assert str(err.value) == f"{site_config}: " + message.format(tmp=site_config.parent)


def test_unreadable_site_configuration_is_named(site_config: Path):
    site_config.write_bytes(b"{\x80")
    with pytest.raises(SiteConfigError, match="site configuration not UTF-8 text") as err:
        resolve("site-1")
    assert str(err.value).startswith(f"{site_config}: ")


@pytest.mark.parametrize("name", ["../lists/site-1", "/etc/passwd", "..", "", "a\0b"])
def test_job_cannot_name_a_datalist_outside_the_sites_folder(site_config: Path, name: str):
    """The job travels to every site: the datalist it names is a name in the site's folder, never a path."""
    assert resolve("site-1", "site-All").datalist.name == "site-All.json"
    with pytest.raises(ValueError, match="is not a plain datalist name"):
        resolve("site-1", name)


def test_bad_thread_count_in_the_environment_is_named(site_config: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(THREADS_VAR, "many")
    with pytest.raises(ValueError, match=r"\$BRATS_FL_THREADS='many' is not a whole number >= 1"):
        resolve("site-1")
    monkeypatch.setenv(THREADS_VAR, "3")
    assert resolve("site-1").threads == 3


def _partition(root: Path, out: Path, split: tuple[float, float, float], sites: int = 2) -> Path:
    """Datalists of ``root``'s cases over ``sites`` sites, and a site configuration pointing at them."""
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, write_datalists

    write_datalists(root, assign_sites(find_cases(root), sites, "equal"), out / "lists", split=split)
    config = out / "config.json"
    config.write_text(json.dumps({"data_root": str(root), "datalist_dir": str(out / "lists")}))
    return config


def test_a_datalist_without_a_split_the_job_scores_is_refused_naming_the_job(good_cohort: Path, tmp_path: Path):
    from brats_fl.jobs.simulate import check_site_data

    config = _partition(good_cohort, tmp_path, (0.75, 0.25, 0))
    with pytest.raises(ValueError) as err:
        check_site_data("brats_fedavg", ["site-1", "site-2"], config, tmp_path / "ws")
    assert str(err.value).startswith(
        "brats_fedavg scores each site's validation split every round and its test split after training, but "
        f"site-1's datalist {tmp_path / 'lists' / 'site-1.json'} has no test case (train/val/test 2/1/0)"
    )
    # the pooled job reads site-All alone, which every partition writes
    (tmp_path / "lists" / "site-1.json").unlink()
    check_site_data("brats_fedavg", [], config, tmp_path / "ws")
    with pytest.raises(ValueError, match="brats_central .* site-1's datalist .*site-All.json has no test case"):
        check_site_data("brats_central", ["site-1"], config, tmp_path / "ws")
    good = _partition(good_cohort, tmp_path / "good", (0.4, 0.3, 0.3))
    check_site_data("brats_fedavg", ["site-1", "site-2"], good, tmp_path / "ws")


@pytest.mark.parametrize("problem", ["empty datalist folder", "no test split"])
def test_run_refuses_bad_site_data_before_flare_starts(good_cohort: Path, tmp_path: Path, problem: str, capsys):
    """The issue's new user: a site configuration pointing at an empty datalist folder started FLARE's simulator and
    left the cause in a site's log. Now nothing starts: no workspace is made."""
    config = _partition(good_cohort, tmp_path, (0.75, 0.25, 0) if problem == "no test split" else (0.6, 0.2, 0.2))
    if problem == "empty datalist folder":
        (tmp_path / "lists3").mkdir()
        config.write_text(json.dumps({"data_root": str(good_cohort), "datalist_dir": str(tmp_path / "lists3")}))
    workspace = tmp_path / "ws"
    argv = ["run", "brats_fedavg", "--rounds", "1", "--site-config", str(config), "--workspace", str(workspace)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = {
        "empty datalist folder": f"{config}: no datalist for site-1 in {tmp_path / 'lists3'}; it holds []",
        "no test split": f"site-1's datalist {tmp_path / 'lists' / 'site-1.json'} has no test case",
    }[problem]
    assert expected in err
    assert not workspace.exists()
