"""The benchmark's matrix, resumption, progress and page, on synthetic run summaries (no FLARE)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from brats_fl.results.benchmark import (
    ALGORITHMS,
    ENTRIES,
    PROFILES,
    VARIANTS,
    Progress,
    RunSpec,
    job_params,
    matrix,
    pending,
)
from brats_fl.results.benchmark_page import UNTRAINED, bytes_per_round, rising_table, write_page

CASES = [f"case{i:02d}" for i in range(20)]


def test_algorithms_are_the_catalogue_without_segviz():
    from brats_fl.jobs.registry import JOBS

    assert set(ALGORITHMS) == {j for j in JOBS if "segviz" not in j}
    assert len(ALGORITHMS) == 18


def test_matrix_follows_the_profile_and_its_restrictions():
    full = PROFILES["full"]
    runs = matrix(full)
    assert len(runs) == (23 * 2 + 3 * 3 + 1 + 5) * 3
    assert {r.algorithm for r in runs if r.partition == "label"} == {"brats_central", "brats_local", "brats_fedavg"}
    assert {r.algorithm for r in runs if r.partition == "quantity"} == {
        "brats_central", "brats_local", "brats_fedavg", "brats_fedper"}  # fmt: skip
    assert {r.algorithm for r in runs if r.partition == "mixed"} == set(ENTRIES)
    assert {r.algorithm for r in runs if r.partition == "scanners"} == {
        "brats_local",
        "brats_fedavg",
        "brats_hyperseg_conv",
        "brats_hyperseg_conv_bn",
        "brats_hyperseg_conv_bn_emb",
    }
    assert job_params(full, "brats_hyperseg_conv", 0, "scanners").sites == 4
    assert job_params(full, "brats_hyperseg_conv", 0, "mixed").sites == 3
    narrowed = matrix(full, algorithms=["brats_fedavg"], partitions=["iid"], seeds=2)
    assert narrowed == [RunSpec("iid", "brats_fedavg", 0), RunSpec("iid", "brats_fedavg", 1)]
    with pytest.raises(ValueError, match="brats_segviz_fedavg"):
        matrix(full, algorithms=["brats_segviz_fedavg"])


def test_smoke_runs_every_algorithm_on_two_partitions():
    runs = matrix(PROFILES["smoke"])
    assert len({r.partition for r in runs}) >= 2
    for partition in {r.partition for r in runs}:
        assert {r.algorithm for r in runs if r.partition == partition} == set(ENTRIES)


def test_like_for_like_entries_differ_from_their_reference_in_one_thing_only():
    """FedAvg on FedBN's batch-norm U-Net; SCAFFOLD and FedAvg with plain SGD; central and FedAvg with the nnU-Net
    recipe: each entry's job parameters are its reference's with the compared setting changed, and nothing else."""
    from dataclasses import replace

    from brats_fl.jobs.catalogue import _batch_norm
    from torch import nn

    full = PROFILES["full"]
    fedavg = job_params(full, "brats_fedavg", 1, "mixed")
    bn = job_params(full, "brats_fedavg_bn", 1, "mixed")
    assert replace(bn, norm=None) == fedavg and bn.norm == "batch"
    # the very U-Net FedBN's job trains, batch norm's running statistics included
    fedbn = _batch_norm(job_params(full, "brats_fedbn", 1, "mixed"))
    assert bn.model().state_dict().keys() == fedbn.model().state_dict().keys()
    assert any(isinstance(m, nn.BatchNorm3d) for m in bn.model().modules())

    sgd = job_params(full, "brats_scaffold_sgd", 0)
    assert sgd == job_params(full, "brats_fedavg_sgd", 0)  # SCAFFOLD's like-for-like FedAvg
    assert replace(sgd, recipe="adam_dice", momentum=None, lr=None) == job_params(full, "brats_scaffold", 0)
    plain = sgd.train_settings()
    assert (plain.optimizer, plain.momentum, plain.lr, plain.loss) == ("sgd", 0.0, 0.1, "dice_ce")

    for job in ("brats_central", "brats_fedavg"):
        nnunet = job_params(full, f"{job}_nnunet", 2)
        assert replace(nnunet, recipe="adam_dice") == job_params(full, job, 2)
        recipe = nnunet.train_settings()
        assert (recipe.optimizer, recipe.momentum, recipe.loss, recipe.lr_schedule) == ("sgd", 0.9, "dice_ce", "poly")
    assert matrix(full, algorithms=["brats_scaffold_sgd"], partitions=["iid"], seeds=1) == [
        RunSpec("iid", "brats_scaffold_sgd", 0)
    ]


def test_an_entry_setting_its_job_does_not_use_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(VARIANTS, "brats_fedavg_mu", ("brats_fedavg", {"mu": 0.1}))
    with pytest.raises(ValueError, match=r"brats_fedavg_mu: brats_fedavg does not use \['mu'\]"):
        job_params(PROFILES["full"], "brats_fedavg_mu", 0)


def test_job_params_take_the_run_seed_and_only_what_the_job_uses():
    from dataclasses import replace

    profile = replace(PROFILES["smoke"], params={**PROFILES["smoke"].params, "mu": 0.5, "finetune_epochs": 1})
    prox = job_params(profile, "brats_fedprox", 3)
    assert prox.seed == 3 and prox.mu == 0.5 and prox.rounds == 2 and prox.channels == (8, 16, 32)
    assert prox.finetune_epochs is None  # not a fine-tuning job
    assert job_params(profile, "brats_fedavg", 0).mu == 0.01  # FedProx's mu stays FedProx's
    assert job_params(profile, "brats_fedavg_ft", 0).finetune_epochs == 1


def test_pending_skips_finished_runs_and_clears_half_finished_ones(tmp_path: Path):
    done, half, new = RunSpec("iid", "a", 0), RunSpec("iid", "b", 0), RunSpec("iid", "c", 0)
    done.folder(tmp_path).mkdir(parents=True)
    (done.folder(tmp_path) / "summary.json").write_text("{}")
    (done.folder(tmp_path) / "run.log").write_text("kept")
    half.folder(tmp_path).mkdir(parents=True)
    (half.folder(tmp_path) / "run.log").write_text("killed half way")
    assert pending([done, half, new], tmp_path) == [half, new]
    assert not half.folder(tmp_path).exists()
    assert (done.folder(tmp_path) / "run.log").read_text() == "kept"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_a_plain_line_per_run_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=3, parallel=1, stream=stream)
    spec = RunSpec("iid", "brats_fedavg", 0)
    progress.start(spec)
    progress.finish(spec, "done iid/brats_fedavg/seed0", ok=True)
    assert stream.getvalue() == "done iid/brats_fedavg/seed0\n"
    assert progress.status().startswith("1 of 3 runs done (0 failed), 0 running, 2 left;")
    assert "min left" in progress.status()


def test_progress_rewrites_one_status_line_on_a_terminal():
    stream = _Tty()
    progress = Progress(total=2, parallel=2, stream=stream)
    progress.start(RunSpec("iid", "a", 0))
    assert stream.getvalue().endswith("0 of 2 runs done (0 failed), 1 running, 1 left")
    assert "\n" not in stream.getvalue()


def _rows(mean: float, seed: int, sites: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, case in enumerate(CASES):
        dice = {r: float(np.clip(mean + 0.1 * np.sin(i) + rng.normal(0, 0.01), 0, 1)) for r in ("WT", "TC", "ET")}
        row = {"site": f"site-{i % sites + 1}", "case_id": case, **{f"dice_{r}": v for r, v in dice.items()}}
        row |= {f"hd95_{r}": 10 * (1 - v) for r, v in dice.items()}
        iou = {r: v / (2 - v) for r, v in dice.items()}
        row |= {f"iou_{r}": v for r, v in iou.items()} | {"iou_mean": float(np.mean(list(iou.values())))}
        rows.append(row | {"dice_mean": float(np.mean(list(dice.values()))), "hd95_mean": 10 * (1 - row["dice_WT"])})
    return rows


def _write_run(out: Path, partition: str, algorithm: str, seed: int, mean: float) -> None:
    folder = RunSpec(partition, algorithm, seed).folder(out)
    folder.mkdir(parents=True)
    summary = {
        "partition": partition,
        "algorithm": algorithm,
        "seed": seed,
        "test": {"dice_mean": mean, "worst_site": "site-2", "worst_dice_mean": mean - 0.1},
        "per_case": _rows(mean, seed),
        "val_dice": {"site-1": [0.1, mean / 2, mean], "site-2": [0.2, mean / 2, mean]},
        "bytes_sent_per_site": 0 if algorithm == "brats_local" else 3 * 2**20,
        "global_model": {"weights_sha256": f"{algorithm}{seed}".ljust(64, "0"), "file_sha256": "0" * 64},
        "wall_time": 42.0,
        "machine": {"cpu": "test cpu", "cores": 2},
        "versions": {"brats-fl": "0"},
    }
    if algorithm != "brats_local":  # a run of a brats-fl before the privacy ledger and the client loss records none
        summary["privacy"] = "epsilon 8, delta 1e-05 (dp-sgd)" if algorithm == "brats_fedprox" else "no guarantee"
        summary["client_train_loss"] = 0.1 * (seed + 1)
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def benchmark_dir(tmp_path: Path) -> Path:
    means = {"brats_central": 0.8, "brats_fedavg": 0.7, "brats_fedprox": 0.7, "brats_local": 0.5}
    for partition in ("iid", "feature"):
        for algorithm, mean in means.items():
            for seed in range(3):
                _write_run(tmp_path, partition, algorithm, seed, mean)
        untrained = tmp_path / "partitions" / partition / "untrained.json"
        untrained.parent.mkdir(parents=True)
        untrained.write_text(json.dumps({str(s): _rows(0.05, s) for s in range(3)}))
    return tmp_path


def _table(md: str, title: str) -> list[list[str]]:
    """The rows of the first table after the heading ``title``."""
    lines = md.split(f"### {title}", 1)[1].strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")) :]  # after any text above it
    table = [line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table if not line.startswith("|---")]


def _interval(cell: str) -> tuple[float, float, float]:
    """'0.700 [0.650, 0.750]' -> (0.7, 0.65, 0.75)."""
    match = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell)
    assert match, cell
    return tuple(float(x) for x in match.groups())


def test_page_has_every_row_intervals_tests_and_curves(benchmark_dir: Path):
    index = write_page(benchmark_dir)
    md = index.read_text()
    for partition in ("iid", "feature"):
        section = md.split(f"## Partition: {partition}", 1)[1]
        scores = _table(section, "Scores")
        assert scores[0][:3] == ["algorithm", "seeds", "Dice WT"]
        names = [row[0] for row in scores[1:]]
        assert names == ["central", "local", "fedavg", "fedprox", UNTRAINED]
        fedavg = dict(zip(scores[0], next(r for r in scores if r[0] == "fedavg"), strict=True))
        assert fedavg["seeds"] == "3"
        estimate, low, high = _interval(fedavg["Dice mean"])
        assert low < estimate < high and estimate == pytest.approx(0.7, abs=0.02)
        gap = float(fedavg["gap to central (Dice)"].split()[0])
        assert gap == pytest.approx(-0.1, abs=0.01)
        estimate, low, high = _interval(fedavg["IoU mean"])
        assert low < estimate < high and estimate == pytest.approx(0.7 / 1.3, abs=0.03)
        losses = {row[0]: dict(zip(scores[0], row, strict=True))["client loss"] for row in scores[1:]}
        assert losses == {"central": "0.200", "local": "", "fedavg": "0.200", "fedprox": "0.200", UNTRAINED: ""}
        privacy = {row[0]: dict(zip(scores[0], row, strict=True))["privacy (ledger)"] for row in scores[1:]}
        assert privacy == {"central": "no guarantee", "local": "not recorded", "fedavg": "no guarantee",
                           "fedprox": "epsilon 8, delta 1e-05 (dp-sgd)", UNTRAINED: ""}  # fmt: skip
        tests = _table(section, "Paired tests")
        assert tests[0][-1] == "verdict"
        verdicts = {(r[0], r[1]): r[-1] for r in tests[1:]}
        assert verdicts[("central", "fedavg")] == "better"
        assert verdicts[("local", "central")] == "worse"
        assert verdicts[("fedprox", "fedavg")] == "not separated"
        assert "test cases (" in section and "This partition has 20 test cases" in section
        for figure in (f"curves_{partition}.png", f"curves_bytes_{partition}.png"):
            assert figure in section and (benchmark_dir / "figures" / figure).is_file()
        # local-only training sends nothing: not on the bytes axis, and said so
        assert "(local: nothing sent, not drawn)" in section
        assert _table(section, "Learning curves")[1] == ["central", "3", "", "too few rounds to tell"]
    html = (benchmark_dir / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "brats_fedprox0".ljust(64, "0") in md


def test_curves_still_rising_at_the_end_are_named_and_bytes_are_shared_over_the_rounds():
    rounds = np.arange(1, 21)
    curves = {
        "flat": [list(0.8 * (1 - np.exp(-rounds / 2))), list(0.8 * (1 - np.exp(-rounds / 3)))],
        "rising": [list(0.04 * rounds)],
        "short": [[0.1, 0.2, 0.3]],
    }
    header, rows = rising_table(curves)
    verdicts = {row[0]: row[-1] for row in rows}
    assert verdicts == {"flat": "flat", "rising": "still rising", "short": "too few rounds to tell"}
    # 0.04 per round, smoothed (the last point averages two), over the last 5 of 20 rounds
    assert float(rows[1][2]) == pytest.approx(0.04 * (19.5 - 15), abs=1e-3)
    runs = {
        "brats_fedavg": [{"val_dice": {"site-1": [0.1] * 10}, "bytes_sent_per_site": 20 * 2**20}],
        "brats_local": [{"val_dice": {"site-1": [0.1] * 10}, "bytes_sent_per_site": 0}],
    }
    assert bytes_per_round(runs) == {"fedavg": 2.0}


def test_paired_tests_use_the_seeds_every_algorithm_has(benchmark_dir: Path):
    """FedAvg's seeds 1 and 2 score far lower than its seed 0; FedProx has seed 0 alone. Over FedAvg's three seeds
    FedProx would look better; on the seed both have they are alike."""
    for seed in (1, 2):
        shutil.rmtree(RunSpec("iid", "brats_fedprox", seed).folder(benchmark_dir))
        shutil.rmtree(RunSpec("iid", "brats_fedavg", seed).folder(benchmark_dir))
        _write_run(benchmark_dir, "iid", "brats_fedavg", seed, 0.4)
    section = write_page(benchmark_dir).read_text().split("## Partition: iid", 1)[1].split("## Partition:", 1)[0]
    assert "On seed(s) 0, the seeds every algorithm of this partition has finished." in section
    tests = _table(section, "Paired tests")
    verdicts = {(r[0], r[1]): r[-1] for r in tests[1:]}
    assert verdicts[("fedprox", "fedavg")] == "not separated"
    scores = {row[0]: row[1] for row in _table(section, "Scores")[1:]}
    assert scores["fedavg"] == "3" and scores["fedprox"] == "1"  # the scores keep every seed


def test_runs_that_post_processed_get_a_table_without_and_with_it(benchmark_dir: Path):
    """FedAvg's runs scored their predictions also as they were: 0.05 lower voxel-wise, 0.3 lower lesion-wise."""
    assert "### Post-processing" not in write_page(benchmark_dir).read_text()  # no run post-processed: no table
    for seed in range(3):
        path = RunSpec("iid", "brats_fedavg", seed).folder(benchmark_dir) / "summary.json"
        summary = json.loads(path.read_text())
        for row in summary["per_case"]:
            for r in ("WT", "TC", "ET"):
                row[f"lesion_dice_{r}"] = row[f"dice_{r}"]
                row[f"unprocessed_dice_{r}"] = row[f"dice_{r}"] - 0.05
                row[f"unprocessed_lesion_dice_{r}"] = row[f"dice_{r}"] - 0.3
        volumes = {"site-1": {"volumes": {"WT": 200.0, "TC": 50.0, "ET": 0.0}, "pooled": ["WT"]}}
        path.write_text(json.dumps(summary | {"post_processing": volumes}))
    section = write_page(benchmark_dir).read_text().split("## Partition: iid", 1)[1].split("## Partition:", 1)[0]
    (header, *rows) = _table(section, "Post-processing")
    assert [row[0] for row in rows] == ["fedavg"]  # only the runs that post-processed
    row = dict(zip(header, rows[0], strict=True))
    before, after = (float(v) for v in row["Dice WT: without → with"].split(" → "))
    assert after - before == pytest.approx(0.05, abs=1e-3) and after == pytest.approx(0.7, abs=0.02)
    before, after = (float(v) for v in row["lesion-wise Dice ET: without → with"].split(" → "))
    assert after - before == pytest.approx(0.3, abs=1e-3)
    assert row["seeds"] == "3" and row["volumes chosen (mm³, WT/TC/ET)"] == "200/50/0"


def test_page_is_rebuilt_from_what_is_there(benchmark_dir: Path):
    """Runs still missing (a benchmark under way) leave their rows out; nothing else breaks."""
    import shutil

    shutil.rmtree(benchmark_dir / "runs" / "feature")
    md = write_page(benchmark_dir).read_text()
    assert "## Partition: iid" in md and "## Partition: feature" not in md


def test_a_folder_refuses_another_profile(tmp_path: Path):
    from brats_fl.results.benchmark import check_profile

    check_profile(PROFILES["smoke"], tmp_path)
    check_profile(PROFILES["smoke"], tmp_path)  # the same again: resuming
    with pytest.raises(ValueError, match="another profile"):
        check_profile(PROFILES["full"], tmp_path)


def test_the_benchmark_trains_on_the_hard_phantom_and_a_folder_of_easy_runs_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``smoke`` and ``full`` build their partitions from the phantom as hard as BraTS, ``ci`` from the demo's; a
    folder whose runs were on the demo's phantom is never resumed with hard cases."""
    from dataclasses import replace

    from brats_fl.data import cohorts
    from brats_fl.results import benchmark

    assert PROFILES["smoke"].hard and PROFILES["full"].hard and not PROFILES["ci"].hard
    asked = []
    monkeypatch.setattr(cohorts, "build_partition", lambda *a, **k: asked.append(k["hard"]) or tmp_path)
    for name in ("full", "ci"):
        benchmark.prepare_partition("iid", tmp_path, PROFILES[name])
    assert asked == [True, False]
    easy = tmp_path / "easy"
    benchmark.check_profile(replace(PROFILES["full"], hard=False), easy)
    with pytest.raises(ValueError, match="another profile"):
        benchmark.check_profile(PROFILES["full"], easy)


def test_site_data_resolves_paths_relative_to_the_configuration(tmp_path: Path):
    from brats_fl.results.benchmark import site_data

    config = tmp_path / "partitions" / "iid" / "site_config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"data_root": "../cohorts/fets", "datalist_dir": "datalists", "threads": 1}))
    assert site_data(config) == {
        "data_root": str(tmp_path / "partitions" / "cohorts" / "fets"),
        "datalist_dir": str(tmp_path / "partitions" / "iid" / "datalists"),
    }
