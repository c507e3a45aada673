"""Run brats-fl jobs on a real FLARE system: a POC on one machine or a provisioned project with mTLS.

A deployment is a folder of startup kits (``nvflare poc prepare`` or ``nvflare provision``). Jobs name the
installed package's classes, so the server's kit and every site's kit allow ``brats_fl.`` in their
``local/resources.json`` (:func:`brats_fl.ops.policy.install_policy`); each site's data configuration goes into
its kit's ``local/brats_fl_site.json`` (see :mod:`brats_fl.site.config`); jobs stay unchanged. :class:`System`
starts the server and the sites as separate processes, one process group each, and stops exactly the processes
it started (and the job processes FLARE spawned under them) by their process ids. Jobs are submitted, followed
and downloaded through FLARE's session API (``nvflare.fuel.flare_api``) with an admin startup kit: the same calls
the admin console makes.

``brats_fl.cli.ops`` registers ``brats-fl poc prepare|start|submit|stop|clean`` (docs/howto/deploy.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from brats_fl.ops.policy import install_policy
from brats_fl.site.config import ENV_VAR, LOCAL_FILE

#: the POC's project administrator (``nvflare poc prepare``'s default user)
POC_ADMIN = "admin@nvidia.com"
#: glibc's limit on malloc arenas. Unset, a multi-threaded process may open 8 per core, each a heap that grows and
#: is seldom given back; FLARE advises 4 at the server and 2 at a site (``nvflare.fuel.utils.memory_utils``)
ARENA_VAR = "MALLOC_ARENA_MAX"
#: glibc's size above which a block is mapped on its own and unmapped when freed. Unset, glibc raises it to the size
#: of the largest block freed so far, so the server's process, which relays every model between the sites and the
#: job, comes to keep those buffers in its heap, which fragments and grew 10-13 % over 200 rounds; fixed at 64 KiB at
#: the server it grew 2.7 % (docs/performance.md). Only at the server: a site's training would map and unmap its tensors
MMAP_VAR = "MALLOC_MMAP_THRESHOLD_"
#: glibc settings ``System`` starts each participant with, unless the environment sets them (docs/howto/deploy.md)
ALLOCATOR = {"server": {ARENA_VAR: "4", MMAP_VAR: "65536"}, "site": {ARENA_VAR: "2"}}
#: processes started by ``brats-fl poc start``, so that ``brats-fl poc stop`` finds them again
PIDS_FILE = "brats_fl_processes.json"
#: builders of a provisioned project: kits, mTLS certificates and signed startup folders
BUILDERS = [
    {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
    {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
    {"path": "nvflare.lighter.impl.cert.CertBuilder"},
    {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def project_config(
    name: str,
    sites: list[str],
    port: int,
    server: str = "localhost",
    admins: dict[str, str] | None = None,
) -> dict:
    """A FLARE project (api_version 3): one server on ``server:port`` (FL and admin), ``sites``, ``admins``.

    ``admins`` maps each admin's e-mail to its role; the default is one project administrator.
    """
    admins = admins or {"admin@consortium.org": "project_admin"}
    participants = [{"name": server, "type": "server", "org": "consortium", "fed_learn_port": port}]
    participants += [{"name": site, "type": "client", "org": site.replace("-", "_")} for site in sites]
    participants += [
        {"name": user, "type": "admin", "org": "consortium", "role": role} for user, role in admins.items()
    ]
    return {
        "api_version": 3,
        "name": name,
        "description": "brats-fl federated brain-tumour segmentation",
        "participants": participants,
        "builders": BUILDERS,
    }


def write_project(path: Path, config: dict) -> Path:
    """Write a project configuration as ``project.yml``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(command: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return out.stdout


def provision(project_file: Path, workspace: Path) -> Path:
    """``nvflare provision -p project_file -w workspace``, with the server's kit allowing brats-fl's classes (each
    site allows them when it installs its data configuration) and keeping its jobs in its own folder; returns the
    folder of the new startup kits.

    FLARE's provisioned server keeps every job it is sent in ``/tmp/nvflare/jobs-storage``, shared by every server
    provisioned on the machine: each lists the others' jobs, and may schedule a job submitted to another. The kit's
    ``local/resources.json`` moves that store, and the snapshots, into ``<server kit>/jobs-storage`` and
    ``snapshot-storage``, with FLARE's own helper, the one its POC uses."""
    from nvflare.lighter.utils import update_storage_locations

    doc = yaml.safe_load(Path(project_file).read_text())
    _run(["nvflare", "provision", "-p", str(project_file), "-w", str(workspace)])
    kits = latest_kits(Path(workspace) / doc["name"])
    for participant in doc["participants"]:
        if participant["type"] == "server":
            kit = (kits / participant["name"]).resolve()
            update_storage_locations(local_dir=str(kit / "local"), workspace=str(kit))
            install_policy(kit)
    return kits


def latest_kits(project_dir: Path) -> Path:
    """The newest ``prod_NN`` folder of a provisioned project."""
    prods = sorted(Path(project_dir).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
    if not prods:
        raise FileNotFoundError(f"{project_dir}: no startup kits (prod_NN); provision first")
    return prods[-1]


def install_site_config(kit: Path, data_root: Path, datalist_dir: Path, threads: int | None = None) -> Path:
    """Install brats-fl at a site: its data configuration in its startup kit (``local/brats_fl_site.json``), and
    brats-fl's classes in the kit's allow-list, which FLARE checks before it builds a job's components."""
    install_policy(kit)
    doc: dict = {"data_root": str(Path(data_root).resolve()), "datalist_dir": str(Path(datalist_dir).resolve())}
    if threads:
        doc["threads"] = threads
    target = Path(kit) / LOCAL_FILE
    target.write_text(json.dumps(doc, indent=1) + "\n")
    return target


def set_heartbeat_timeout(server_kit: Path, seconds: float) -> Path:
    """Declare a site dead after ``seconds`` without a heartbeat (FLARE's default is 600 s).

    Written into the server's site-local ``local/resources.json`` (which overrides the provisioned default),
    keeping what is already there, such as brats-fl's allow-list.
    """
    local = Path(server_kit) / "local"
    source = local / "resources.json"
    doc = json.loads((source if source.is_file() else local / "resources.json.default").read_text())
    doc["servers"][0]["heart_beat_timeout"] = seconds
    (local / "resources.json").write_text(json.dumps(doc, indent=2))
    return local / "resources.json"


def poc_prepare(workspace: Path, sites: int, port: int, env: dict[str, str] | None = None) -> Path:
    """``nvflare poc prepare -i <project> --force`` in ``workspace`` with the server on ``localhost:port``.

    The POC project is FLARE's own (server ``server``, admin ``admin@nvidia.com``) with a port of our
    choosing, so that several POCs and other users of this machine do not collide on 8002/8003.
    The server's kit allows brats-fl's classes; returns the folder of the startup kits.
    """
    workspace = Path(workspace).resolve()
    names = [f"site-{i}" for i in range(1, sites + 1)]
    config = project_config("brats_poc", names, port, server="server", admins={POC_ADMIN: "project_admin"})
    project = write_project(workspace.parent / f"{workspace.name}_project.yml", config)
    env = (env or dict(os.environ)) | {"NVFLARE_POC_WORKSPACE": str(workspace)}
    _run(["nvflare", "poc", "prepare", "-i", str(project), "--force"], env=env)
    kits = latest_kits(workspace / "brats_poc")
    install_policy(kits / "server")
    return kits


def _descendants(pids: list[int]) -> list[psutil.Process]:
    """The processes ``pids`` and everything below them (FLARE's job processes run in their own sessions)."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def kill_processes(pids: list[int], timeout: float = 30, hard: bool = False) -> None:
    """Stop ``pids`` and their descendants: SIGTERM (SIGKILL if ``hard``), then SIGKILL after ``timeout``.

    A process stopped by SIGSTOP (a hung site, :meth:`System.hang`) is continued after the signal, which it
    would otherwise handle only when continued."""
    procs = _descendants(pids)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            proc.resume()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _cmdline_has(proc: psutil.Process, text: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(text in part for part in proc.cmdline())
    return False


@dataclass
class JobResult:
    """A finished job: its id, FLARE's final status and where its downloaded result is."""

    job_id: str
    status: str
    folder: Path | None

    @property
    def completed(self) -> bool:
        return self.status == "FINISHED:COMPLETED"


class System:
    """The server and sites of one set of startup kits, each started as its own process (``--once``)."""

    def __init__(self, kits: Path, server: str, admin: str, env: dict[str, str] | None = None):
        self.kits = Path(kits).resolve()
        self.server = server
        self.admin = admin
        # a site reads its kit's local/brats_fl_site.json, never a configuration inherited from here
        self.env = {k: v for k, v in (env or os.environ).items() if k != ENV_VAR}
        self.processes: dict[str, subprocess.Popen] = {}

    def kit(self, name: str) -> Path:
        return self.kits / name

    def start(self, name: str) -> int:
        """Start one participant from its startup kit, in its own process group; returns its pid."""
        kit = self.kit(name)
        log = (kit / "console.log").open("ab")
        allocator = ALLOCATOR["server" if name == self.server else "site"]
        self.processes[name] = subprocess.Popen(
            ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
            cwd=kit,
            env=allocator | self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self.processes[name].pid

    def start_all(self, sites: list[str], timeout: float = 180) -> None:
        """Start the server, then ``sites``; return once the server lists every site as connected."""
        self.start(self.server)
        for site in sites:
            self.start(site)
        self.wait_for_sites(sites, timeout)

    @contextlib.contextmanager
    def session(self, user: str | None = None, timeout: float = 60) -> Iterator:
        """A FLARE session API session with an admin's startup kit (mTLS, the kit's certificate)."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        user = user or self.admin
        sess = new_secure_session(user, str(self.kit(user)), timeout=timeout, command_timeout=120)
        try:
            yield sess
        finally:
            sess.close()

    def connected_sites(self) -> list[str]:
        with self.session() as sess:
            return sorted(c.name for c in sess.get_connected_client_list())

    def wait_for_sites(self, sites: list[str], timeout: float = 180) -> None:
        """Wait until every site in ``sites`` is connected; raises with the console logs' tails if not."""
        deadline = time.monotonic() + timeout
        connected: list[str] = []
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(Exception):
                connected = self.connected_sites()
                if set(sites) <= set(connected):
                    return
            time.sleep(2)
        raise TimeoutError(f"after {timeout:.0f} s only {connected} of {sites} are connected\n{self.logs()}")

    def _check_alive(self) -> None:
        dead = [n for n, p in self.processes.items() if n == self.server and p.poll() is not None]
        if dead:
            raise RuntimeError(f"the server exited ({self.processes[self.server].returncode})\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        """The last lines of every started participant's console log."""
        out = []
        for name in self.processes:
            path = self.kit(name) / "console.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)

    def run_job(self, job_folder: Path, download_to: Path, timeout: float = 900, user: str | None = None) -> JobResult:
        """Submit ``job_folder``, wait for it to end and download its result (server side)."""
        with self.session(user) as sess:
            job_id = sess.submit_job(str(Path(job_folder).resolve()))
            meta = sess.wait_for_job(job_id, timeout=timeout, poll_interval=3)
            folder = Path(sess.download_job_result(job_id, str(Path(download_to).resolve())))
        return JobResult(job_id=job_id, status=str(meta.get("status")), folder=folder)

    def kill(self, name: str) -> None:
        """Kill a participant at once (SIGKILL, with its job processes): a site that dies."""
        kill_processes([self.processes.pop(name).pid], hard=True)

    def job_processes(self, name: str, job_id: str) -> list[psutil.Process]:
        """The processes participant ``name`` runs job ``job_id`` in: FLARE starts one job process per job below
        the participant's process (``worker_process`` at a site), which fetches the job's tasks and runs them."""
        procs = _descendants([self.processes[name].pid])
        jobs = [p for p in procs if _cmdline_has(p, job_id)]
        return _descendants([p.pid for p in jobs])

    def hang(self, name: str, job_id: str) -> list[psutil.Process]:
        """Stop participant ``name``'s job processes of ``job_id`` with SIGSTOP: a hung site. Its own process keeps
        its connection and its heartbeat, so the server never deems it dead; :meth:`unhang` continues them."""
        procs = self.job_processes(name, job_id)
        if not procs:
            raise RuntimeError(f"{name} runs no process of job {job_id}\n{self.logs()}")
        for proc in procs:
            proc.suspend()
        return procs

    def unhang(self, procs: list[psutil.Process]) -> None:
        """Continue processes that :meth:`hang` stopped (SIGCONT), those still there."""
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.resume()

    def stop(self, timeout: float = 30) -> None:
        """Stop every process this object started, and the job processes below them."""
        pids = [p.pid for p in self.processes.values() if p.poll() is None]
        kill_processes(pids, timeout=timeout)
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- `brats-fl poc ...`


def _poc_system(workspace: Path) -> System:
    return System(latest_kits(Path(workspace).resolve() / "brats_poc"), server="server", admin=POC_ADMIN)


def _sites(kits: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in kits.glob("*/startup/fed_client.json"))


def _cmd_prepare(args: argparse.Namespace) -> None:
    kits = poc_prepare(args.workspace, args.sites, args.port)
    if args.heartbeat_timeout:
        set_heartbeat_timeout(kits / "server", args.heartbeat_timeout)
    for site in _sites(kits):
        path = install_site_config(kits / site, args.data_root, args.datalist_dir, args.threads)
        print(f"{site}: data configuration {path}")
    print(f"POC startup kits in {kits}; next: brats-fl poc start --workspace {args.workspace}")


def _cmd_start(args: argparse.Namespace) -> None:
    system = _poc_system(args.workspace)
    record = Path(args.workspace) / PIDS_FILE
    if record.exists():
        raise FileExistsError(f"{record}: a POC seems to run; `brats-fl poc stop --workspace {args.workspace}`")
    sites = _sites(system.kits)
    try:
        system.start_all(sites, timeout=args.timeout)
    except BaseException:
        system.stop()
        raise
    pids = {name: {"pid": p.pid, "kit": str(system.kit(name))} for name, p in system.processes.items()}
    record.write_text(json.dumps(pids, indent=1))
    print(f"POC running: server and {', '.join(sites)} (process ids in {record})")


def _cmd_submit(args: argparse.Namespace) -> int:
    system = _poc_system(args.workspace)
    result = system.run_job(args.job, args.download, timeout=args.timeout)
    print(f"job {result.job_id}: {result.status}; result in {result.folder}")
    return 0 if result.completed else 1


def stop_recorded(workspace: Path) -> list[int]:
    """Stop the processes that ``brats-fl poc start`` recorded, if they still run the recorded kits."""
    record = Path(workspace) / PIDS_FILE
    if not record.exists():
        return []
    pids = []
    for entry in json.loads(record.read_text()).values():
        with contextlib.suppress(psutil.Error):
            if entry["kit"] in " ".join(psutil.Process(entry["pid"]).cmdline()):
                pids.append(entry["pid"])
    kill_processes(pids)
    record.unlink()
    return pids


def _cmd_stop(args: argparse.Namespace) -> None:
    print(f"stopped process(es) {stop_recorded(args.workspace) or 'none'}")


def _cmd_clean(args: argparse.Namespace) -> None:
    stop_recorded(args.workspace)
    workspace = Path(args.workspace)
    shutil.rmtree(workspace, ignore_errors=True)
    Path(f"{workspace}_project.yml").unlink(missing_ok=True)
    print(f"removed {workspace}")
