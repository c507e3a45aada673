"""`brats-fl report` on a real (tiny) FedAvg run in FLARE's simulator, and the run record the job writes."""

from __future__ import annotations

import csv
import html
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from brats_fl.cli.main import main
from brats_fl.protocol import DONE_FILE, RUN_RECORD
from brats_fl.results.figures import BARS_SIZE, CURVES_SIZE, DPI, PAGE_WIDTH
from brats_fl.results.report import REPORT_COLUMNS, overlay_rows, run_test_cases, summarise_run
from brats_fl.version import running

REPO = Path(__file__).resolve().parents[2]

SITES = ("site-1", "site-2", "site-3")


def _server(workspace: Path) -> Path:
    return workspace / "brats_fedavg" / "server" / "simulate_job"


def _site(workspace: Path, site: str) -> Path:
    return workspace / "brats_fedavg" / site / "simulate_job" / "brats_fl"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_report_writes_every_file_with_the_runs_numbers(fedavg_run, tmp_path: Path, capsys):
    workspace, params = fedavg_run
    out = tmp_path / "report"
    assert main(["report", str(workspace), "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out

    # the table holds what the run stored: each site's test scores pooled over cases, the sites' own records
    stored = json.loads((_server(workspace) / "personalised" / "results.json").read_text())
    (row,) = _rows(out)
    assert list(row) == REPORT_COLUMNS
    total = sum(m["cases"] for m in stored.values())
    for key in REPORT_COLUMNS[5:17]:
        expected = sum(m[key] * m["cases"] for m in stored.values()) / total
        assert float(row[key]) == pytest.approx(expected, rel=1e-12), key
    worst = min(stored, key=lambda s: stored[s]["dice_mean"])
    assert row["worst_site"] == worst and float(row["worst_site_dice_mean"]) == stored[worst]["dice_mean"]
    last = {s: json.loads((_site(workspace, s) / "rounds.jsonl").read_text().splitlines()[-1]) for s in SITES}
    assert float(row["client_loss"]) == pytest.approx(sum(r["train_loss"] for r in last.values()) / 3, rel=1e-6)
    assert float(row["bytes_sent_per_site_per_round"]) == max(r["bytes_sent"] for r in last.values())
    record = json.loads((_server(workspace) / RUN_RECORD).read_text())
    assert float(row["wall_time_s"]) == record["wall_time"]
    assert (row["algorithm"], row["partition"], row["sites"], row["rounds"]) == (
        "fedavg", "natural (scanner)", "3", str(params.rounds)
    )  # fmt: skip
    markdown = (out / "results.md").read_text()
    assert f"| {float(row['dice_mean']):.3f} |" in markdown and "| natural (scanner) |" in markdown

    # figures: PNGs of the sizes a paper column (curves, bars) or page (overlays) takes
    (case_png,) = out.glob("overlay_*.png")
    assert _png_size(out / "curves_fedavg.png") == (round(CURVES_SIZE[0] * DPI), round(CURVES_SIZE[1] * DPI))
    assert _png_size(out / "sites.png") == (round(BARS_SIZE[0] * DPI), round(BARS_SIZE[1] * DPI))
    assert _png_size(case_png)[0] == round(PAGE_WIDTH * DPI)

    # one self-contained page: every figure embedded, nothing linked, the run's configuration shown
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and 'src="http' not in page and '.png"' not in page
    assert record["code_sha256"] in page and "seed=0" in page


@pytest.mark.slow
def test_job_records_what_the_run_was(fedavg_run):
    workspace, params = fedavg_run
    record = json.loads((_server(workspace) / RUN_RECORD).read_text())
    assert record["job"] == "brats_fedavg" and record["finished"] and record["wall_time"] > 0
    assert record["complete"] is True and record["incomplete_reason"] is None
    for site in SITES:
        done = json.loads((_site(workspace, site) / DONE_FILE).read_text())
        assert done["complete"] is True and done["incomplete_reason"] is None and done["wall_time"] > 0
    executor = record["client_config"]["executors"][0]["executor"]["args"]
    assert (executor["config"]["seed"], executor["config"]["rounds"]) == (params.seed, params.rounds)
    assert executor["expects"] == running()
    assert record["server_config"]["workflows"][0]["args"]["num_rounds"] == params.rounds
    assert all(record["versions"][p] for p in ("python", "torch", "monai", "nvflare"))
    assert record["code_sha256"] == running()["code_sha256"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert record["git"]["commit"] == head.stdout.strip()


@pytest.mark.slow
def test_overlay_scores_the_model_the_table_scored(fedavg_run):
    """The overlay's prediction for a test case is that case's prediction in the site's own test scores."""
    workspace, _ = fedavg_run
    summary = summarise_run(workspace)
    cases = run_test_cases(summary)
    case_id, (_, site) = sorted(cases.items())[0]
    _, truth, (row,) = overlay_rows(case_id, [("fedavg", summary, cases)])
    stored = json.loads((_site(workspace, site) / "personalised_test.json").read_text())
    (scores,) = [c for c in stored["per_case"] if c["case_id"] == case_id]
    assert row.dice == pytest.approx({r: scores[f"dice_{r}"] for r in ("WT", "TC", "ET")}, abs=1e-6)
    assert set(truth) == set(row.regions) == {"WT", "TC", "ET"} and truth["WT"].any()


@pytest.mark.slow
def test_report_from_the_servers_results_alone(fedavg_run, sim_data: Path, tmp_path: Path):
    """What `nvflare job download` gives: the server's run folder only; cases come from the user's datalists."""
    workspace, _ = fedavg_run
    downloaded = tmp_path / "download" / "job-1234"
    shutil.copytree(_server(workspace), downloaded)
    site_config = json.loads(sim_data.read_text())
    out = tmp_path / "report"
    args = ["report", str(workspace), str(downloaded.parent), "--out", str(out)]
    assert main([*args, "--data-root", site_config["data_root"], "--datalist", site_config["datalist_dir"]]) == 0
    full, alone = _rows(out)
    assert full["run"] != alone["run"]
    assert all(full[k] == alone[k] for k in REPORT_COLUMNS if k != "run")
    (case_png,) = out.glob("overlay_*.png")
    assert _png_size(case_png)[0] == round(PAGE_WIDTH * DPI)

    # without the datalists the table and curves are still written, with no overlay
    bare = tmp_path / "bare"
    assert main(["report", str(downloaded.parent), "--out", str(bare)]) == 0
    assert (bare / "results.csv").is_file() and not list(bare.glob("overlay_*.png"))


@pytest.mark.slow
def test_a_run_without_metrics_is_named(fedavg_run, tmp_path: Path, capsys):
    workspace, _ = fedavg_run
    broken = tmp_path / "unfinished"
    shutil.copytree(_server(workspace), broken / "simulate_job")
    (broken / "simulate_job" / "personalised" / "results.json").unlink()
    assert main(["report", str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "personalised/results.json" in err
    assert not (tmp_path / "out" / "index.html").exists()

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'empty'}: no finished FLARE job" in capsys.readouterr().err


@pytest.mark.slow
def test_incomplete_run_is_left_out_of_tables_unless_asked(fedavg_run, tmp_path: Path, capsys):
    """A run aborted after its sites' final scoring (in cross-site evaluation, say) has scores, but is no result:
    the tables refuse it, and show it marked only when asked."""
    workspace, _ = fedavg_run
    stopped = tmp_path / "stopped"
    shutil.copytree(_server(workspace), stopped / "simulate_job")
    record_file = stopped / "simulate_job" / RUN_RECORD
    reason = "the run was aborted (an admin's abort_job, or FLARE stopping it)"
    record = json.loads(record_file.read_text()) | {"complete": False, "incomplete_reason": reason}
    record_file.write_text(json.dumps(record))

    assert main(["table", str(workspace), str(stopped)]) == 2
    assert f"{stopped}: the run did not complete ({reason}); a results table leaves it out" in capsys.readouterr().err
    assert main(["table", str(workspace), str(stopped), "--include-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "brats_fedavg (stopped) (incomplete), worst site" in out and f"{stopped}: incomplete, {reason}" in out
    assert f"brats_fedavg ({workspace.name}), worst site" in out

    assert main(["report", str(stopped), "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused" / "index.html").exists()
    assert main(["report", str(stopped), "--out", str(tmp_path / "out"), "--include-incomplete"]) == 0
    (row,) = _rows(tmp_path / "out")
    assert row["run"].endswith(" (incomplete)")
    assert html.escape(f"no: {reason}") in (tmp_path / "out" / "index.html").read_text()
