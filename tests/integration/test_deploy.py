"""Real FLARE deployments on loopback: a provisioned project with mTLS, and a POC (no mocks).

Every test starts the server and the sites as separate processes from their startup kits, talks to the
server through an admin startup kit (FLARE's session API, or FLARE's interactive admin console through a
pseudo-terminal, as an administrator types it) and stops every process it started, by process id, in
``finally`` (``System.__exit__``), whatever happens. The provisioned project of the first two tests is
started once for both (``deployment``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.export import export_jobs
from brats_fl.jobs.resume import checkpoint_round, resume_job
from brats_fl.ops import deploy
from brats_fl.ops.policy import deny_custom_code
from brats_fl.results.report import summarise_run
from brats_fl.seg.model import fingerprint
from brats_fl.version import PACKAGE_DIR
from conftest import tiny_params
from nvflare.fuel.flare_api.api_spec import AuthorizationError

SITES = ["site-1", "site-2"]

ADMIN = "admin@consortium.org"

ORG_ADMIN = "orgadmin@hospital-a.org"

TINY = tiny_params(rounds=2, local_epochs=1, sites=2, lr=3e-3)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lists(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lists")
    write_datalists(tiny_phantom, assign_sites(find_cases(tiny_phantom), 2, "equal", seed=0), root)
    return root


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_jobs(tmp_path_factory.mktemp("jobs"), ["brats_fedavg"], params=TINY)[0]


@pytest.fixture(scope="module")
def bundled(job: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job bringing brats-fl's code along (``app/custom/brats_fl``): custom code, FLARE's "BYOC"."""
    folder = shutil.copytree(job, tmp_path_factory.mktemp("bundled") / job.name)
    shutil.copytree(PACKAGE_DIR, folder / "app" / "custom" / "brats_fl", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private HOME, so that FLARE's startup-kit registry (~/.nvflare) of this machine is left alone."""
    return dict(os.environ) | {"HOME": str(tmp_path / "home")}


@pytest.fixture(scope="module")
def deployment(
    tiny_phantom: Path, lists: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[deploy.System, Path]]:
    """A provisioned project (mTLS) of a server and two sites with their data, started for the module's tests."""
    root = tmp_path_factory.mktemp("deployment")
    kits = _project(root, "brats_hospitals", SITES)
    for site in SITES:
        deploy.install_site_config(kits / site, tiny_phantom, lists, threads=1)
    with deploy.System(kits, "localhost", ADMIN, env=dict(os.environ) | {"HOME": str(root / "home")}) as system:
        system.start_all(SITES, timeout=240)
        yield system, kits


def _project(tmp_path: Path, name: str, sites: list[str], admins: dict[str, str] | None = None, port: int = 0) -> Path:
    config = deploy.project_config(name, sites, port or deploy.free_port(), admins=admins)
    return deploy.provision(deploy.write_project(tmp_path / f"{name}.yml", config), tmp_path / "provisioned")


def _check_result(result: deploy.JobResult, kits: Path) -> None:
    assert result.completed, result
    server = result.folder / "workspace"
    model = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    assert any(k.endswith("weight") for k in model["model"])
    summary = summarise_run(result.folder)
    assert set(summary["test_per_site"]) == set(SITES)
    for site in SITES:
        assert len(summary["curves"][site]["val_dice_WT"]) == TINY.rounds
        record = kits / site / result.job_id / "brats_fl"
        rows = [json.loads(line) for line in (record / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(TINY.rounds))
        # the site found its data through its own kit, not through anything in the job
        source = json.loads((record / "site.json").read_text())["data"]["source"]
        assert source == str(kits / site / "local" / "brats_fl_site.json")


def _wait_for_checkpoint(system: deploy.System, job_id: str, rnd: int, timeout: float = 300) -> Path:
    """The server's global model of job ``job_id`` once it has closed round ``rnd``."""
    path = system.kit(system.server) / job_id / "app_server" / "FL_global_model.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and checkpoint_round(path) == rnd:
            return path
        time.sleep(1)
    raise TimeoutError(f"{path}: round {rnd} not closed after {timeout:.0f} s\n{system.logs()}")


def _rows(kits: Path, site: str, job_id: str) -> list[dict]:
    lines = (kits / site / job_id / "brats_fl" / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _check_resumed(kits: Path, job_id: str, checkpoint: Path, before: str, rnd: int) -> None:
    """Job ``job_id`` began at round ``rnd`` from ``checkpoint``'s weights, and every site from the personal layers
    it had after round ``rnd - 1`` of job ``before``."""
    weights = fingerprint(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    for site in SITES:
        kept = {row["round"]: row["kept"] for row in _rows(kits, site, before)}
        resumed = json.loads((kits / site / job_id / "brats_fl" / "site.json").read_text())["resumed_from"]
        assert (resumed["round"], resumed["personal"]) == (rnd - 1, kept[rnd - 1]), (site, resumed)
        first = _rows(kits, site, job_id)[0]
        assert (first["round"], first["received"]) == (rnd, weights), site


@pytest.mark.slow
def test_provisioned_project_runs_a_job_submitted_with_the_admin_kit(deployment, job, tmp_path):
    system, kits = deployment
    assert (
        json.loads((kits / "localhost" / "startup" / "fed_server.json").read_text())["servers"][0][
            "connection_security"
        ]
        == "mtls"
    )
    result = system.run_job(job, tmp_path / "results", timeout=900)
    _check_result(result, kits)


class Console:
    """FLARE's interactive admin console (the admin kit's ``startup/fl_admin.sh``) in a pseudo-terminal, typed to
    as an administrator types: a line, then the console's answer up to its next prompt. ``transcript`` is the
    session as it appeared on the terminal."""

    PROMPT = "\n> "

    def __init__(self, kit: Path, env: dict[str, str]):
        self.child = pexpect.spawn(
            "bash", [str(kit / "startup" / "fl_admin.sh")], cwd=str(kit), env=env, encoding="utf-8", timeout=120
        )
        self.transcript = ""

    def _read(self, pattern: str) -> str:
        self.child.expect_exact(pattern)
        seen = self.child.before + self.child.after
        self.transcript += seen
        return seen

    def login(self, user: str) -> str:
        self._read("User Name: ")
        self.child.sendline(user)
        return self._read(self.PROMPT)

    def type(self, line: str, confirm: str | None = None) -> str:
        """Type ``line``; answer the console's confirmation question with ``confirm``; returns the answer."""
        self.child.sendline(line)
        if confirm is not None:
            self._read("(y/N): ")
            self.child.sendline(confirm)
        return self._read(self.PROMPT)

    def status(self, job_id: str) -> str:
        """The status ``list_jobs`` shows for ``job_id``."""
        found = re.search(rf"\|\s*{job_id}\s*\|[^|]*\|\s*(\S+)\s*\|", self.type("list_jobs"))
        assert found, self.transcript[-2000:]
        return found.group(1)

    def wait_for(self, job_id: str, status: str, timeout: float = 600) -> str:
        """Follow ``job_id`` with ``list_jobs`` until it shows ``status`` or has finished; returns what it shows."""
        deadline = time.monotonic() + timeout
        while (shown := self.status(job_id)) != status and not shown.startswith("FINISHED"):
            assert time.monotonic() < deadline, f"{job_id} still {shown} after {timeout:.0f} s"
            time.sleep(5)
        return shown

    def close(self) -> None:
        self.child.sendline("bye")
        self.child.expect(pexpect.EOF)
        self.transcript += self.child.before
        self.child.close()


@pytest.mark.slow
def test_the_admin_console_submits_follows_downloads_and_aborts_jobs(deployment, job, tmp_path):
    """An administrator's session: log in, submit a job folder (from the kit's transfer/ folder, FLARE's upload
    folder), submit it again, abort the second, follow both with list_jobs, download the first's result."""
    system, kits = deployment
    kit = kits / ADMIN
    shutil.copytree(job, kit / "transfer" / job.name)
    started = time.monotonic()
    console = Console(kit, system.env)
    try:
        console.login(ADMIN)
        first = re.search(r"Submitted job: (\S+)", console.type(f"submit_job {job.name}")).group(1)
        second = re.search(r"Submitted job: (\S+)", console.type(f"submit_job {job.name}")).group(1)
        assert console.wait_for(second, "RUNNING") == "RUNNING"
        console.type(f"abort_job {second}", confirm="y")
        assert console.wait_for(second, "FINISHED:ABORTED", timeout=120) == "FINISHED:ABORTED"
        assert console.wait_for(first, "FINISHED:COMPLETED") == "FINISHED:COMPLETED"
        console.type(f"download_job {first}")
        console.close()
    finally:
        console.child.close(force=True)
        (tmp_path / "console.txt").write_text(console.transcript)
    print(f"admin console session: {time.monotonic() - started:.0f} s; transcript {tmp_path / 'console.txt'}")
    # the result came down into the kit's transfer/ folder (FLARE's download folder), the job's whole server side
    folder = kit / "transfer" / first
    _check_result(deploy.JobResult(job_id=first, status="FINISHED:COMPLETED", folder=folder), kits)
    record = json.loads((folder / "workspace" / "brats_fl_run.json").read_text())
    assert record["job_id"] == first, record


@pytest.mark.slow
def test_altered_kits_and_roles_without_custom_code_rights_are_refused(tmp_path, job, bundled, env):
    port = deploy.free_port()
    admins = {ADMIN: "project_admin", ORG_ADMIN: "org_admin"}
    kits = _project(tmp_path / "ours", "brats_hospitals", ["site-1", "site-2", "site-3"], admins, port)
    other = _project(tmp_path / "other", "brats_elsewhere", ["site-2", "site-3"], {ADMIN: "project_admin"}, port)
    # site-2: the whole kit of a site of the same name, signed for another project (same server address)
    shutil.rmtree(kits / "site-2")
    shutil.copytree(other / "site-2", kits / "site-2")
    # site-3: our kit with its certificate and key swapped for another project's (our root CA kept)
    for name in ("client.crt", "client.key"):
        shutil.copy(other / "site-3" / "startup" / name, kits / "site-3" / "startup" / name)
    with deploy.System(kits, "localhost", ADMIN, env=env) as system:
        system.start_all(["site-1"], timeout=240)
        system.start("site-2")
        system.start("site-3")
        time.sleep(30)
        assert system.connected_sites() == ["site-1"], system.logs()
        assert "CERTIFICATE_VERIFY_FAILED" in (kits / "site-2" / "console.log").read_text()
        assert "Successfully registered client:site-3" not in (kits / "site-3" / "console.log").read_text()
        # the other project's admin kit cannot log in to our server
        with pytest.raises(Exception), deploy.System(other, "localhost", ADMIN, env=env).session(timeout=15):  # noqa: B017
            pass
        # org_admin may not submit jobs, neither one with custom code ('byoc': 'none') nor one without: FLARE's
        # default policy grants it no 'submit_job' (sites that refuse custom code from a submitter who may submit:
        # test_sites_that_deny_custom_code_run_exported_jobs_and_refuse_bundled_ones)
        for folder in (bundled, job):
            with system.session(ORG_ADMIN) as sess, pytest.raises(AuthorizationError, match="not authorized"):
                sess.submit_job(str(folder))


@pytest.mark.slow
def test_sites_that_deny_custom_code_run_exported_jobs_and_refuse_bundled_ones(
    tiny_phantom, lists, job, bundled, tmp_path, env
):
    """Hospitals that take the 'byoc' right from every role (their own local/authorization.json) refuse a job that
    brings code, whoever submits it, and run the exported jobs, which bring none, submitted by the same admin."""
    kits = _project(tmp_path, "brats_no_byoc", SITES)
    for site in SITES:
        deploy.install_site_config(kits / site, tiny_phantom, lists, threads=1)
        deny_custom_code(kits / site)
    with deploy.System(kits, "localhost", ADMIN, env=env) as system:
        system.start_all(SITES, timeout=240)
        with system.session() as sess:
            refused = sess.submit_job(str(bundled))
            meta = sess.wait_for_job(refused, timeout=120, poll_interval=1)
            detail = sess.get_job_meta(refused).get("job_deploy_detail", [])
        result = system.run_job(job, tmp_path / "results", timeout=900)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: BYOC not permitted" in detail, detail
        assert not (kits / site / refused).exists()
    _check_result(result, kits)


@pytest.mark.slow
def test_poc_site_then_server_die_mid_job_and_resumed_jobs_continue(tiny_phantom, lists, tmp_path, env):
    """Site death: the server stops the job. Server death: FLARE 2.9 cannot resume, brats-fl's resume-job can. Each
    resumed job starts from the last global model its predecessor's server kept, every site from its own FedPer
    head of that round, whatever it had trained since; the second resumed job finishes the job."""
    params = JobParams(**{**vars(TINY), "rounds": 3})
    job = export_jobs(tmp_path / "jobs", ["brats_fedper"], params=params)[0]
    kits = deploy.poc_prepare(tmp_path / "poc", 2, deploy.free_port(), env=env)
    for site in SITES:
        deploy.install_site_config(kits / site, tiny_phantom, lists, threads=1)
    deploy.set_heartbeat_timeout(kits / "server", 20)
    with deploy.System(kits, "server", deploy.POC_ADMIN, env=env) as system:
        system.start_all(SITES, timeout=240)
        with system.session() as sess:
            first = sess.submit_job(str(job))
            _wait_for_checkpoint(system, first, 0)
            system.kill("site-2")  # while it trains round 1
            meta = sess.wait_for_job(first, timeout=600, poll_interval=3)
            # the job has ended: its server folder is gone, its last global model is in its result
            downloaded = Path(sess.download_job_result(first, str(tmp_path / "first")))
        assert meta["status"] != "FINISHED:COMPLETED", meta
        checkpoint = downloaded / "workspace" / "app_server" / "FL_global_model.pt"
        log = (kits / "server" / "console.log").read_text()
        assert "received dead job report for client site-2" in log
        assert "Alive clients 1 < required min 2" in log
        system.start("site-2")
        system.wait_for_sites(SITES, timeout=240)

        second_job, _ = resume_job(job, checkpoint, tmp_path / "resume_1")
        with system.session() as sess:
            second = sess.submit_job(str(second_job))
            on_server = _wait_for_checkpoint(system, second, 1)
        system.kill("server")  # while the sites train round 2
        # the job's folder stays on the server's disk when its process dies: take its last global model from there
        second_checkpoint = Path(shutil.copy(on_server, tmp_path / "second_FL_global_model.pt"))
        system.start("server")
        system.wait_for_sites(SITES, timeout=240)

        third_job, done = resume_job(second_job, second_checkpoint, tmp_path / "resume_2")
        assert done == 1
        result = system.run_job(third_job, tmp_path / "results", timeout=600)
    assert result.completed, result
    # site-1 trained round 1 of the first job before it stopped: its newest state was a round past the checkpoint
    assert [row["round"] for row in _rows(kits, "site-1", first)] == [0, 1]
    _check_resumed(kits, second, checkpoint, first, 1)
    _check_resumed(kits, result.job_id, second_checkpoint, second, 2)
    for site in SITES:
        assert [row["round"] for row in _rows(kits, site, result.job_id)] == [2]
        assert (kits / site / result.job_id / "brats_fl" / "personalised_test.json").is_file()
    final = result.folder / "workspace" / "app_server" / "FL_global_model.pt"
    assert checkpoint_round(final) == 2


def test_committed_project_provisions_three_hospitals_with_mtls(tmp_path: Path):
    kits = deploy.provision(REPO / "site_configs" / "project.yml", tmp_path)
    sites = sorted(p.parents[1].name for p in kits.glob("*/startup/fed_client.json"))
    assert sites == ["hospital-a", "hospital-b", "hospital-c"]
    for site in sites:
        config = json.loads((kits / site / "startup" / "fed_client.json").read_text())
        assert config["client"]["connection_security"] == "mtls"
        resources = json.loads((kits / site / "local" / "resources.json.default").read_text())
        assert resources["class_list_enforcement_mode"] == "enforce"
        policy = json.loads((kits / site / "local" / "authorization.json.default").read_text())["permissions"]
        assert policy["lead"]["byoc"] == "any" and policy["org_admin"]["byoc"] == "none"
    admins = {p.parents[1].name for p in kits.glob("*/startup/fed_admin.json")}
    assert len(admins) == 4
    # the server keeps its jobs in its own kit, not in FLARE's /tmp/nvflare shared by every server on the machine
    (server,) = [p.parents[1] for p in kits.glob("*/startup/fed_server.json")]
    resources = json.loads((server / "local" / "resources.json").read_text())
    (manager,) = [c for c in resources["components"] if c["id"] == "job_manager"]
    assert manager["args"]["uri_root"] == str((server / "jobs-storage").resolve())
    assert "brats_fl." in resources["class_allow_list"]
