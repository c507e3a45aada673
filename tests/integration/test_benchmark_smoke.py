"""``brats-fl benchmark --profile ci``, for real: every algorithm of the profile on its partition in FLARE's
simulator, the page, and a second invocation that finds every run finished and only rebuilds the page. (The smoke
profile, every algorithm on two partitions, takes about 25 minutes on two cores: docs/howto/benchmark.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.results.benchmark import PROFILES, matrix
from brats_fl.results.benchmark_page import UNTRAINED


@pytest.mark.slow
def test_ci_benchmark_runs_every_algorithm_and_resumes(tmp_path: Path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "--profile", "ci", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    profile = PROFILES["ci"]
    runs = matrix(profile)
    # one line per run with its pooled Dice and weights hash, for comparing CI logs with other machines
    assert sum(line.startswith("done ") and "weights sha256" in line for line in printed.splitlines()) == len(runs)

    md = (out / "index.md").read_text()
    for partition in profile.partitions:
        section = md.split(f"## Partition: {partition}", 1)[1].split("## Partition:", 1)[0]
        scores = section.split("### Scores", 1)[1].split("###", 1)[0]
        header = scores.strip().splitlines()[0]
        assert "Dice mean" in header and "HD95 mean (mm)" in header and "gap to central (Dice)" in header
        rows = [line for line in scores.strip().splitlines()[2:] if line.startswith("|")]
        names = [line.split("|")[1].strip() for line in rows]
        assert names == [a.removeprefix("brats_") for a in profile.algorithms] + [UNTRAINED]
        # what each run's privacy ledger guarantees: nothing, for jobs without DP-SGD
        assert "privacy (ledger)" in header
        assert all("no differential-privacy guarantee" in line for line in rows[:-1])
        assert "[" in scores  # confidence intervals
        tests = section.split("### Paired tests", 1)[1]
        assert "p (Holm)" in tests and "verdict" in tests
        assert "test cases" in section  # the sample size
        assert f"figures/curves_{partition}.png" in section

        untrained = json.loads((out / "partitions" / partition / "untrained.json").read_text())
        floor = np.mean([row["dice_mean"] for rows in untrained.values() for row in rows])
        for algorithm in profile.algorithms:
            summary = json.loads((out / "runs" / partition / algorithm / "seed0" / "summary.json").read_text())
            assert summary["test"]["dice_mean"] > floor, (partition, algorithm, summary["test"]["dice_mean"], floor)
            assert len(summary["global_model"]["weights_sha256"]) == 64
    # two figures per partition: validation Dice against rounds and against the bytes each site sent
    assert (out / "index.html").read_text().count("data:image/png;base64,") == 2 * len(profile.partitions)

    # resuming: every run is finished, nothing runs again, the page is rebuilt
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/summary.json")}
    (out / "index.md").unlink()
    assert main(["benchmark", "--profile", "ci", "--out", str(out)]) == 0
    assert f"{len(runs)} of {len(runs)} runs finished already, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/summary.json")} == stamps
    assert (out / "index.md").read_text() == md
