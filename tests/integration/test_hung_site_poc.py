"""A hung site is not a dead site: a POC whose site-3 stops answering in the middle of a job (no mocks).

site-3's job process, the one that fetches the job's tasks and trains (FLARE's ``worker_process`` below the
site's client process), is stopped with SIGSTOP once the job runs. Its client process goes on sending heartbeats
over its open connection, so the server never deems site-3 dead (it stays connected throughout): only the
job's own limits end the wait. Stopping the client process as well would make a dead site once the heartbeat
timeout has passed, which ``test_deploy.py`` covers with a killed site.

One POC runs four jobs in turn: FedAvg with a quorum closes its rounds without site-3, and its evaluation after
training, which waits as long as the round timeout, leaves site-3 out after it; the cyclic job skips
site-3's visit after the pick-up timeout; FedAvg without a quorum but with a round timeout stops, naming site-3,
and so does HyperSeg, whose rounds follow the same round timeout.
Every test continues what it stopped (and ``System.stop`` stops what is left) whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.export import export_jobs
from brats_fl.ops import deploy
from brats_fl.protocol import PERSONALISED_RESULTS as PERSONALISED_FILE
from brats_fl.protocol import SCREENING_FILE, VISITS_FILE
from brats_fl.seg.model import fingerprint
from conftest import tiny_params

SITES = ["site-1", "site-2", "site-3"]
HUNG = "site-3"
#: a round closes ROUND_WAIT s after 2 of the 3 sites have answered; without a quorum it ends after ROUND_TIMEOUT s
ROUND_WAIT, ROUND_TIMEOUT = 3, 40
#: a cyclic visit not picked up within PICK_UP s is skipped; the evaluation after training waits EVAL_TIMEOUT s, the
#: round timeout of the job with a quorum (its rounds close sooner, ROUND_WAIT s after their second answer)
PICK_UP, EVAL_TIMEOUT = 15, 30
#: what the machine may add to a configured time (log lines, a busy 2-core machine)
SLACK = 15
TINY = tiny_params(rounds=2, local_epochs=1, sites=3, lr=3e-3, cross_site="none")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@pytest.fixture(scope="module")
def poc(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[deploy.System]:
    """A POC of a server and three sites of the tiny phantom (4 cases each), started once for the module."""
    root = tmp_path_factory.mktemp("hung")
    write_datalists(tiny_phantom, assign_sites(find_cases(tiny_phantom), 3, "equal", seed=0), root / "lists")
    # a private HOME, so that FLARE's startup-kit registry (~/.nvflare) of this machine is left alone
    env = dict(os.environ) | {"HOME": str(root / "home")}
    kits = deploy.poc_prepare(root / "poc", len(SITES), deploy.free_port(), env=env)
    for site in SITES:
        deploy.install_site_config(kits / site, tiny_phantom, root / "lists", threads=1)
    with deploy.System(kits, "server", deploy.POC_ADMIN, env=env) as system:
        system.start_all(SITES, timeout=240)
        yield system


def _job(tmp_path: Path, name: str, **settings) -> Path:
    return export_jobs(tmp_path / "jobs", [name], params=JobParams(**{**vars(TINY), **settings}))[0]


def _events(system: deploy.System, job_id: str, text: str) -> list[tuple[float, str]]:
    """(time, line) of the server's log lines of job ``job_id`` that contain ``text``."""
    out = []
    for line in (system.kit(system.server) / "console.log").read_text(errors="replace").splitlines():
        stamp = STAMP.match(line)
        if stamp and f"run={job_id}" in line and text in line:
            out.append((datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return out


def _wait_for(system: deploy.System, job_id: str, text: str, count: int = 1, timeout: float = 300) -> list:
    """The first ``count`` server log lines of job ``job_id`` with ``text``, once there are that many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _events(system, job_id, text)
        if len(found) >= count:
            return found[:count]
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id}: no {count} x {text!r} after {timeout:.0f} s\n{system.logs(40)}")


def _assigned(site: str) -> str:
    return f"sent task assignment to client. client_name:{site} "


@pytest.mark.slow
def test_fedavg_with_a_quorum_closes_its_rounds_without_the_hung_site(poc: deploy.System, tmp_path: Path):
    job = _job(tmp_path, "brats_fedavg", min_responses=2, round_wait=ROUND_WAIT, round_timeout=EVAL_TIMEOUT)
    with poc.session() as sess:
        job_id = sess.submit_job(str(job))
        _wait_for(poc, job_id, _assigned(HUNG))  # site-3 has its round-0 task: it trains when it stops
        hung = poc.hang(HUNG, job_id)
        try:
            closed = _wait_for(poc, job_id, "closed with ['site-1', 'site-2']; left out ['site-3']", TINY.rounds)
            # hung, not dead: the server still counts site-3 among its connected sites
            assert HUNG in poc.connected_sites()
            # still hung at the evaluation after training, which scores the others and names site-3 after
            # round_timeout seconds, eval_timeout being unset
            (evaluation,) = _wait_for(poc, job_id, "scheduled task personalise")
            left_out = "no personalised test scores from ['site-3']"
            (missing,) = _wait_for(poc, job_id, left_out, timeout=EVAL_TIMEOUT + 120)
        finally:
            poc.unhang(hung)
        meta = sess.wait_for_job(job_id, timeout=600, poll_interval=2)
        folder = Path(sess.download_job_result(job_id, str(tmp_path / "result")))
    assert meta["status"] == "FINISHED:COMPLETED", meta
    rows = [json.loads(line) for line in (folder / "workspace" / SCREENING_FILE).read_text().splitlines()]
    assert [(r["round"], sorted(r["averaged"])) for r in rows] == [(r, ["site-1", "site-2"]) for r in range(2)]
    scores = json.loads((folder / "workspace" / PERSONALISED_FILE).read_text())
    assert sorted(scores) == ["site-1", "site-2"]
    waited = missing[0] - evaluation[0]
    print(f"evaluation: site-3 named and left out {waited:.1f} s after it began (round_timeout {EVAL_TIMEOUT} s)")
    assert EVAL_TIMEOUT <= waited <= EVAL_TIMEOUT + SLACK
    # each round closed ROUND_WAIT s after its second answer, not later
    answers = _events(poc, job_id, "for task: name=train")
    for rnd, (closed_at, line) in enumerate(closed):
        assert f"round {rnd} closed" in line
        second = sorted(t for t, _ in answers if t <= closed_at)[2 * rnd + 1]
        waited = closed_at - second
        print(f"round {rnd}: closed {waited:.1f} s after its second answer (round_wait {ROUND_WAIT} s)")
        assert ROUND_WAIT - 0.5 <= waited <= ROUND_WAIT + SLACK, line
    assert not any("client site-3" in line for _, line in answers)


@pytest.mark.slow
def test_the_cyclic_job_skips_the_hung_site_after_its_pick_up_timeout(poc: deploy.System, tmp_path: Path):
    job = _job(tmp_path, "brats_cyclic", passes=1, visit_epochs=1, assignment_timeout=PICK_UP, visit_timeout=600)
    with poc.session() as sess:
        job_id = sess.submit_job(str(job))
        _wait_for(poc, job_id, _assigned("site-1"))  # the ring has started at site-1; site-3 waits for its turn
        hung = poc.hang(HUNG, job_id)
        try:
            (skipped,) = _wait_for(poc, job_id, f"skipped {HUNG}, which did not pick up the model within {PICK_UP} s")
            assert HUNG in poc.connected_sites()
        finally:
            poc.unhang(hung)
        meta = sess.wait_for_job(job_id, timeout=600, poll_interval=2)
        folder = Path(sess.download_job_result(job_id, str(tmp_path / "result")))
    assert meta["status"] == "FINISHED:COMPLETED", meta
    (only_pass,) = json.loads((folder / "workspace" / VISITS_FILE).read_text())["passes"]
    visits = {v["site"]: v for v in only_pass["visits"]}
    assert [visits[s]["status"] for s in SITES] == ["trained", "trained", "skipped"]
    assert visits[HUNG]["reason"] == f"did not pick up the model within {PICK_UP} s"
    # the model went on unchanged: site-3 was offered what site-2 returned, and that is the final model
    assert visits[HUNG]["received"] == visits["site-2"]["returned"]
    final = folder / "workspace" / "app_server" / "FL_global_model.pt"
    assert fingerprint(torch.load(final, map_location="cpu", weights_only=False)["model"]) == visits[HUNG]["received"]
    print(f"cyclic: site-3's visit skipped after {visits[HUNG]['seconds']} s (pick-up timeout {PICK_UP} s)")
    assert PICK_UP <= visits[HUNG]["seconds"] <= PICK_UP + SLACK


@pytest.mark.slow
def test_fedavg_without_a_quorum_stops_naming_the_hung_site_after_its_round_timeout(poc: deploy.System, tmp_path: Path):
    job = _job(tmp_path, "brats_fedavg", rounds=1, round_timeout=ROUND_TIMEOUT)
    with poc.session() as sess:
        job_id = sess.submit_job(str(job))
        (scheduled,) = _wait_for(poc, job_id, "scheduled task train")
        _wait_for(poc, job_id, _assigned(HUNG))
        hung = poc.hang(HUNG, job_id)
        try:
            meta = sess.wait_for_job(job_id, timeout=ROUND_TIMEOUT + 300, poll_interval=1)
            ended = time.time()
        finally:
            poc.unhang(hung)
    # FLARE's status of a job whose controller raised
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION", meta
    why = (
        "round 0: 2 of 3 sites answered, fewer than the 3 required; the round is not averaged. "
        f"No usable answer from: site-3 (round_timeout {ROUND_TIMEOUT} s)"
    )
    ((failed, _),) = _wait_for(poc, job_id, why, timeout=10)
    waited = failed - scheduled[0]
    print(
        f"no quorum: round 0 stopped {waited:.1f} s after it began (round_timeout {ROUND_TIMEOUT} s); "
        f"job {meta['status']} {ended - failed:.1f} s later"
    )
    assert ROUND_TIMEOUT <= waited <= ROUND_TIMEOUT + SLACK
    assert ended - failed <= 60 + SLACK, meta


@pytest.mark.slow
def test_hyperseg_stops_naming_the_hung_site_after_its_round_timeout(poc: deploy.System, tmp_path: Path):
    """HyperSeg's rounds once waited 6 hours for a site; now as long as --round-timeout says."""
    job = _job(tmp_path, "brats_hyperseg_conv", rounds=1, round_timeout=ROUND_TIMEOUT)
    with poc.session() as sess:
        job_id = sess.submit_job(str(job))
        # one training task per site, each with its own personal layers: the first is the round's start
        (scheduled,) = _wait_for(poc, job_id, "scheduled task train")
        _wait_for(poc, job_id, _assigned(HUNG))
        hung = poc.hang(HUNG, job_id)
        try:
            meta = sess.wait_for_job(job_id, timeout=ROUND_TIMEOUT + 300, poll_interval=1)
        finally:
            poc.unhang(hung)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION", meta
    why = f"round 0: no model from ['site-3'] within the round timeout of {ROUND_TIMEOUT} s"
    ((failed, _),) = _wait_for(poc, job_id, why, timeout=10)
    waited = failed - scheduled[0]
    print(f"hyperseg: round 0 stopped {waited:.1f} s after it began (round_timeout {ROUND_TIMEOUT} s)")
    assert ROUND_TIMEOUT <= waited <= ROUND_TIMEOUT + SLACK
