"""``brats-fl benchmark``: every federated algorithm on several partitions and seeds, in FLARE's simulator, and one
page that compares them (:mod:`brats_fl.results.benchmark_page`; :mod:`brats_fl.results.benchmark_run` runs the
matrix and rebuilds the page).

A benchmark folder ``DIR`` holds ``partitions/<name>/`` (each partition's cohort, datalists and site
configuration, made once by ``brats_fl.data.cohorts.build_partition``, and its untrained model's scores),
``runs/<partition>/<algorithm>/seed<k>/`` (one simulator run each, its ``run.log`` and, written last and atomically,
its ``summary.json``) and the page ``index.md`` / ``index.html``. A run with a ``summary.json`` is finished and never
run again; any other run folder is cleared and its run started afresh, so an interrupted benchmark continues with
the same command.

FLARE and torch are imported inside the functions that need them: ``brats-fl --help`` stays instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from brats_fl.jobs.registry import JOBS

#: the jobs the benchmark compares (``brats_fl.jobs.registry.Job.benchmark``)
ALGORITHMS: tuple[str, ...] = tuple(name for name, job in JOBS.items() if job.benchmark)
#: entries that run one of those jobs with settings of its own, so that a pair differs in the one thing it compares
#: (issue 38, item 4): entry -> (job, settings over the profile's). The default rows stay: FedAvg on instance norm,
#: SCAFFOLD with Adam, every job on the profile's recipe
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # FedAvg on FedBN's batch-norm U-Net: FedBN against it differs only in what stays at the sites
    "brats_fedavg_bn": ("brats_fedavg", {"norm": "batch"}),
    # SCAFFOLD as Karimireddy et al. derive it, with plain SGD at the sites: its control variates (x - y_i) / (K lr)
    # estimate a gradient only where each step is lr times one (no momentum, no Adam). Rate 0.1: the step of the
    # nnU-Net recipe's 1e-2 at momentum 0.9 (lr / (1 - momentum)); the recipe's loss, weight decay and poly decay
    "brats_scaffold_sgd": ("brats_scaffold", {"recipe": "nnunet", "momentum": 0.0, "lr": 0.1}),
    # FedAvg with that same plain SGD: what SCAFFOLD's correction is measured against
    "brats_fedavg_sgd": ("brats_fedavg", {"recipe": "nnunet", "momentum": 0.0, "lr": 0.1}),
    # the nnU-Net recipe (SGD with Nesterov momentum 0.9, poly rate, Dice + cross-entropy), centralised and federated
    "brats_central_nnunet": ("brats_central", {"recipe": "nnunet"}),
    "brats_fedavg_nnunet": ("brats_fedavg", {"recipe": "nnunet"}),
}
#: what a benchmark can run: the jobs, then their variants
ENTRIES: tuple[str, ...] = (*ALGORITHMS, *VARIANTS)
#: the references of the paired tests, and the runs every partition needs for them
FEDAVG, CENTRAL = "brats_fedavg", "brats_central"
BASELINES = (CENTRAL, "brats_local", FEDAVG)
#: kinds of data heterogeneity (``brats_fl.data.cohorts.build_partition``)
PARTITIONS = ("iid", "quantity", "feature", "label", "mixed", "scanners")
#: reference 001's comparison: local training, FedAvg and the three HyperSeg variants on four noisy scanners
HYPERSEG = ("brats_local", FEDAVG, "brats_hyperseg_conv", "brats_hyperseg_conv_bn", "brats_hyperseg_conv_bn_emb")
#: the partitions are part of the benchmark, not of a run: every seed trains on the same sites and test cases
PARTITION_SEED = 0


@dataclass(frozen=True)
class Profile:
    """What a benchmark runs: algorithms x partitions x seeds, the cohort, and the job parameters of every run."""

    name: str
    algorithms: tuple[str, ...]
    partitions: tuple[str, ...]
    seeds: int
    #: each partition's phantom cohort (three sites, ``brats_fl.data.cohorts``): cases, grid (voxels),
    #: train/validation/test split
    cases: int
    shape: tuple[int, int, int]
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    #: ``JobParams`` fields set for every run (a run's seed is its own), e.g. ``spacing`` (mm) to train a cohort on
    #: the BraTS grid at lower resolution; a field only some jobs use (``Param.uses``) is given to those jobs alone
    params: dict[str, Any] = field(default_factory=dict)
    #: partition -> the algorithms run on it, where not every one of ``algorithms``
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: cores one run keeps busy (its sites train at once): sets how many runs share the machine
    cores_per_run: int = 3
    #: the phantom as hard as BraTS: labels that vary as raters' do, partial volume, bias fields, faint non-enhancing
    #: tumour (``brats_fl.data.phantom.generate_cases``, docs/explanation/phantom.md); off, the demo's phantom
    hard: bool = False


#: the page scores the model each site ends with on its own test split and nothing else, so the runs leave FLARE's
#: cross-site evaluation out: scoring the server's models on every test case again would double each run's test time
_CHEAP = {"cross_site": "none"}

PROFILES: dict[str, Profile] = {
    # every algorithm on a homogeneous and a scanner-skewed partition with the tiny U-Net and patches of the simulator
    # tests (tests/conftest.py tiny_params) on a 48x48x32 phantom, two rounds: about 25 min on two cores, nearly all of
    # it FLARE's simulator starting five Python processes per run (docs/howto/benchmark.md)
    "smoke": Profile(
        name="smoke",
        algorithms=ENTRIES,
        partitions=("iid", "feature"),
        seeds=1,
        cases=24,
        shape=(48, 48, 32),
        params={**_CHEAP, "rounds": 2, "local_epochs": 3, "patch_size": (32, 32, 32), "channels": (8, 16, 32)},
        hard=True,
    ),
    # the comparison to publish: cases on the BraTS grid (240x240x155 at 1 mm), trained at 2 mm as BraTS pipelines
    # train at lower resolution, scored on each case's own grid. 3 seeds of every algorithm on iid (no skew) and mixed
    # (every skew at once) is 108 runs; on the single-skew partitions the baselines and FedAvg (27 runs) say how much
    # each skew costs, which is what the other algorithms claim to win back, and FedPer joins them on quantity skew,
    # the unequal partition of the BraTS FedPer report (reference 000); on four noisy scanners local training, FedAvg
    # and HyperSeg make reference 001's comparison (15 runs). Half the cases are test cases: 60 pooled. The budget,
    # 160 epochs per training case (rounds x local epochs), is where centralized training's validation Dice reaches
    # its plateau on the profile's iid cohort (benchmarks/plateau.py, 2 seeds; docs/howto/benchmark.md): every
    # algorithm gets it, however it splits it into rounds
    "full": Profile(
        name="full",
        algorithms=ENTRIES,
        partitions=PARTITIONS,
        seeds=3,
        cases=120,
        shape=(240, 240, 155),
        split=(0.4, 0.1, 0.5),
        params={
            **_CHEAP,
            "spacing": 2.0,
            "rounds": 160,
            "local_epochs": 1,
            "patch_size": (48, 48, 48),
            "channels": (16, 32, 64),
        },
        only={"quantity": (*BASELINES, "brats_fedper"), "feature": BASELINES, "label": BASELINES, "scanners": HYPERSEG},
        hard=True,
    ),
}
# what the test suite runs: the smoke profile on the fewest cases a partition takes (6 per site), with the two
# references of the paired tests, on one partition
# on the demo's phantom, which generates faster
PROFILES["ci"] = replace(
    PROFILES["smoke"], name="ci", algorithms=(CENTRAL, FEDAVG), partitions=("iid",), cases=18, hard=False
)
# what the tests of ``brats-fl tune`` run (brats_fl.results.tune): the ci cohort and network, two rounds of one local
# epoch, so that a trial's two seeds are two short runs
PROFILES["tune-ci"] = replace(PROFILES["ci"], name="tune-ci", params={**PROFILES["ci"].params, "local_epochs": 1})


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix."""

    partition: str
    algorithm: str
    seed: int

    def folder(self, out: Path) -> Path:
        return Path(out) / "runs" / self.partition / self.algorithm / f"seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.partition}/{self.algorithm}/seed{self.seed}"


def matrix(
    profile: Profile,
    algorithms: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
    seeds: int | None = None,
) -> list[RunSpec]:
    """The runs of ``profile``, narrowed to ``algorithms`` and ``partitions`` and to seeds 0 .. ``seeds`` - 1."""
    unknown = sorted(set(algorithms or ()) - set(ENTRIES)) + sorted(set(partitions or ()) - set(PARTITIONS))
    if unknown:
        raise ValueError(f"unknown algorithm(s) or partition(s) {unknown}; known: {[*ENTRIES, *PARTITIONS]}")
    return [
        RunSpec(p, a, s)
        for p in partitions or profile.partitions
        for a in algorithms or profile.algorithms
        if a in profile.only.get(p, profile.algorithms)
        for s in range(profile.seeds if seeds is None else seeds)
    ]


def entry_job(algorithm: str) -> str:
    """The catalogue job a benchmark entry runs (``VARIANTS``; a job is its own entry)."""
    return VARIANTS[algorithm][0] if algorithm in VARIANTS else algorithm


def job_params(profile: Profile, algorithm: str, seed: int, partition: str = "iid"):
    """The ``JobParams`` of one run: the profile's settings that ``algorithm``'s job uses, then the entry's own
    (``VARIANTS``), the partition's number of sites, and the run's seed. An entry's setting its job does not use is
    refused."""
    from brats_fl.data.cohorts import PARTITIONS as COHORT_PARTITIONS
    from brats_fl.jobs.catalogue import HyperNetParams, JobParams
    from brats_fl.settings.params import by_name

    job = entry_job(algorithm)
    own = VARIANTS[algorithm][1] if algorithm in VARIANTS else {}
    uses = (None, *JOBS[job].uses)
    unused = sorted(k for k in own if by_name(k).uses not in uses)
    if unused:
        raise ValueError(f"benchmark entry {algorithm}: {job} does not use {unused}")
    kept = {k: v for k, v in profile.params.items() if by_name(k).uses in uses}
    sites = COHORT_PARTITIONS[partition].n_sites
    return JobParams(**kept | own, sites=sites, seed=seed, hypernetwork=HyperNetParams())


def prepare_partition(name: str, root: Path, profile: Profile) -> Path:
    """The site configuration of partition ``name`` under ``root``: its cohort, datalists and configuration, made on
    first use and reused after (``brats_fl.data.cohorts.build_partition``, which refuses a folder made otherwise)."""
    from brats_fl.data.cohorts import build_partition

    out = Path(root).resolve() / "partitions"
    return build_partition(
        name, out, profile.cases, PARTITION_SEED, profile.shape, profile.split, log=lambda _: None, hard=profile.hard
    )


def site_data(site_config: Path) -> dict[str, str]:
    """The data root and datalist folder a site configuration names, as absolute paths (the file gives them relative
    to itself; a run's own copy lives elsewhere)."""
    doc = json.loads(Path(site_config).read_text())
    return {key: str((Path(site_config).parent / doc[key]).resolve()) for key in ("data_root", "datalist_dir")}


def run_site_config(folder: Path, partition_config: Path, out: Path) -> Path:
    """A run's own site configuration in ``folder``: its partition's data, a state folder of its own (personal layers
    kept for a restart, never shared by parallel seeds), and the benchmark's disk cache of decoded, cropped and
    resampled cases, kept for every later run on the same files and pipeline."""
    site_config = Path(folder) / "site_config.json"
    doc = site_data(partition_config) | {"state_dir": str(Path(folder) / "site_state"), "cache_dir": str(out / "cache")}
    _write_json(site_config, doc)
    return site_config


def _write_json(path: Path, doc: Any) -> None:
    """Whole or not at all: a temporary file beside it, then an atomic rename (a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=1, default=str))
    partial.replace(path)


def machine() -> dict[str, Any]:
    """What ran it: the processor and its cores (the run times depend on both)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def model_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of the model file's bytes and of its weights (``brats_fl.seg.model.fingerprint``): the file's may
    differ between torch versions with the same weights; equal weights mean the very same training."""
    import torch

    from brats_fl.seg.model import fingerprint

    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "weights_sha256": fingerprint(state)}


def server_run(summary_file: Path) -> Path:
    """The server's run folder of the run whose ``summary.json`` this is (the summary names it relative to itself)."""
    summary_file = Path(summary_file)
    return summary_file.parent / json.loads(summary_file.read_text())["run"]


def per_case_scores(summary: dict) -> list[dict]:
    """Every test case's scores from the sites' ``personalised_test.json`` (the model each site ends with), with the
    site and the means over the regions the case was scored on."""
    rows = []
    for site, record in sorted(summary["site_records"].items()):
        for row in json.loads((Path(record["dir"]) / "personalised_test.json").read_text())["per_case"]:
            rows.append(_with_means(site, row))
    return rows


def _with_means(site: str, row: dict) -> dict:
    """A per-case row with its site and, per metric, the mean over the regions the case was scored on."""
    means = {
        f"{m}_mean": sum(vs) / len(vs)
        for m in ("dice", "iou", "hd95", "lesion_dice", "lesion_hd95")
        if (vs := [v for k, v in row.items() if k.startswith(f"{m}_")])
    }
    return {"site": site, **row, **means}


def run_summary(run_dir: Path, folder: Path, spec: RunSpec, params: Any, wall_time: float) -> dict:
    """What the page needs of a finished run, and what makes it comparable with a run elsewhere: pooled and per-case
    scores, validation and training-loss curves, traffic, the final global model's hashes, machine, versions and time.
    ``folder`` is where the summary goes; its server run folder is named relative to it (:func:`server_run`)."""
    from brats_fl.results.privacy import ledger_summary
    from brats_fl.results.report import summarise_run
    from brats_fl.server.run_record import package_versions

    summary = summarise_run(run_dir)
    run = Path(summary["run"])
    tag = "pass_val_dice_mean" if entry_job(spec.algorithm) in ("brats_cyclic", "brats_swt") else "val_dice_mean"
    traffic = summary["traffic"]
    return {
        "partition": spec.partition,
        "algorithm": spec.algorithm,
        "seed": spec.seed,
        "test": summary["test"],
        "test_per_site": summary["test_per_site"],
        "per_case": per_case_scores(summary),
        "post_processing": summary["post_processing"],
        "val_dice": {site: tags.get(tag, []) for site, tags in summary["curves"].items()},
        # the sites' training loss per round (client side) and its mean over sites in the last round
        "train_loss": {site: tags.get("train_loss", []) for site, tags in summary["curves"].items()},
        "client_train_loss": summary["client_train_loss"],
        "bytes_sent_per_site": sum(t["sent"] for t in traffic.values()) / len(traffic) if traffic else 0,
        "privacy": ledger_summary(run)["guarantee"],
        "global_model": model_hashes(run / "app_server" / "FL_global_model.pt"),
        "wall_time": wall_time,
        "machine": machine(),
        "versions": package_versions(),
        "params": asdict(params),
        # relative to the run's folder: a summary names no path of the machine it ran on, so it can be published
        "run": os.path.relpath(run, folder),
    }


#: what every benchmark run imports, loaded once by the process its runs are forked from (``run_benchmark``)
RUN_MODULES = ["brats_fl.jobs.simulate", "brats_fl.results.report", "brats_fl.results.privacy", "brats_fl.results.cost"]


def _run_one(spec: RunSpec, params: Any, site_config: Path, folder: Path, cores: int) -> None:
    """A child's work: one simulator run, its output in ``run.log``, its summary, with what the run cost beyond
    training (``brats_fl.results.cost``, from the child's start), written last."""
    import psutil

    from brats_fl.jobs.simulate import run_simulation
    from brats_fl.results.cost import run_cost

    launched = psutil.Process().create_time()
    fd = os.open(folder / "run.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    start = time.perf_counter()
    run_dir = run_simulation(entry_job(spec.algorithm), params, site_config, folder / "workspace", cores=cores)
    summary = run_summary(run_dir, folder, spec, params, time.perf_counter() - start)
    summary["cost"] = run_cost(run_dir, launched, time.time())
    _write_json(folder / "summary.json", summary)


def untrained_scores(site_config: Path, profile: Profile, cache_dir: Path | None = None) -> dict:
    """Per-case Dice and IoU of a freshly initialised model (the profile's architecture, seed 0's initialisation) on
    the partition's pooled test cases: the floor every trained algorithm has to beat. One seed and no distances: an
    untrained model predicts about half the head, whose HD95 says nothing and took 15 s a case at full size, lesion-wise
    included (60 test cases x 3 seeds was over 40 CPU-minutes); its test cases decoded into ``cache_dir`` are the
    runs' too."""
    from brats_fl.data.datalist import load_datalist
    from brats_fl.data.loading import eval_loader
    from brats_fl.data.partition import POOLED_SITE
    from brats_fl.seg.trainer import Trainer, config_from_args
    from brats_fl.site.client import site_args

    doc = site_data(site_config)
    items = load_datalist(Path(doc["datalist_dir"]) / f"{POOLED_SITE}.json", Path(doc["data_root"])).items("test")
    params = job_params(profile, FEDAVG, 0)
    args = site_args(params.client_config())
    args.threads = os.cpu_count()
    trainer = Trainer(config_from_args(args, total_epochs=1), model=params.model())
    scores = trainer.evaluate(eval_loader(items, cache_dir), per_case=True, distances=False)["per_case"]
    return {"0": [_with_means(POOLED_SITE, row) for row in scores]}


class Progress:
    """Runs done / running / left, the mean run time and the time left: one line rewritten in place on a terminal;
    elsewhere (CI logs) only a plain line per finished run, which is printed in both cases."""

    def __init__(self, total: int, parallel: int, stream: TextIO):
        self.total, self.parallel, self.stream = total, parallel, stream
        self.tty = stream.isatty()
        self.done: list[float] = []
        self.failed = 0
        self.started: dict[str, float] = {}

    def start(self, spec: RunSpec) -> None:
        self.started[spec.label] = time.perf_counter()
        self._status()

    def finish(self, spec: RunSpec, line: str, ok: bool) -> None:
        self.done.append(time.perf_counter() - self.started.pop(spec.label))
        self.failed += not ok
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self._status()

    def status(self) -> str:
        left = self.total - len(self.done) - len(self.started)
        done = f"{len(self.done)} of {self.total} runs done ({self.failed} failed)"
        text = f"{done}, {len(self.started)} running, {left} left"
        if self.done:
            mean = sum(self.done) / len(self.done)
            now = time.perf_counter()
            # what the running runs still need, plus the runs not started, shared among the parallel slots
            remaining = sum(max(mean - (now - t), 0) for t in self.started.values()) + left * mean
            text += f"; {mean:.0f} s per run, about {remaining / self.parallel / 60:.0f} min left"
        return text

    def _status(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.status())
        self.stream.flush()

    def tick(self) -> None:
        """Refresh the time left between events."""
        self._status()


def finished_line(spec: RunSpec, folder: Path) -> tuple[str, bool]:
    """One line per run: pooled mean Dice and the weights' hash (compare CI logs with a run elsewhere), or where the
    failed run's log is."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return f"FAILED {spec.label}: see {folder / 'run.log'}", False
    summary = json.loads(summary_file.read_text())
    weights = summary["global_model"]["weights_sha256"]
    return (
        f"done {spec.label}: pooled Dice {summary['test']['dice_mean']:.4f}, weights sha256 {weights}, "
        f"{summary['wall_time']:.0f} s"
    ), True


def check_profile(profile: Profile, out: Path) -> None:
    """Record the profile's data and run settings in ``DIR/profile.json``, or refuse a folder whose runs were made
    with others: its finished runs would be kept and mixed with the new ones on one page."""
    settings = {k: v for k, v in asdict(profile).items() if k in ("name", "cases", "shape", "split", "params")}
    if profile.hard:  # a folder of runs on the demo's phantom keeps its record as it was
        settings["hard"] = True
    settings = json.loads(json.dumps(settings))  # tuples as the file holds them: lists
    path = Path(out) / "profile.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise ValueError(f"{out} holds runs of another profile or settings ({before}); use another --out")
        return
    _write_json(path, settings)


def pending(specs: Sequence[RunSpec], out: Path) -> list[RunSpec]:
    """The runs without a ``summary.json``, their folders cleared: a half-finished run starts afresh, since what a
    killed simulator left cannot be told from what a finished one wrote."""
    todo = [s for s in specs if not (s.folder(out) / "summary.json").is_file()]
    for spec in todo:
        shutil.rmtree(spec.folder(out), ignore_errors=True)
    return todo


def default_parallel(profile: Profile) -> int:
    return max(1, (os.cpu_count() or 1) // profile.cores_per_run)
