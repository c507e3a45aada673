"""Continue a job whose server stopped mid-run. FLARE 2.9 cannot, so brats-fl does.

FLARE 2.9 dropped its snapshot and restore: ``ServerEngine.persist_components`` does nothing ("Component snapshot
persistence has been removed") and nothing calls ``JobRunner.restore_running_job``. A server started again tells
the sites to abort the job it was running, and that job stays ``RUNNING`` in its job store. What a run leaves on
disk is enough to go on, though:

- the server: FLARE's persistor saves the global model after every round, with the round it closed
  (``meta_props["current_round"]``), as ``<server workspace>/<job id>/app_server/FL_global_model.pt``;
- the server state a controller keeps beside it, saved after every round before the global model: HyperSeg's
  hypernetwork (``brats_fl.server.hyperseg``), FedOpt's moments (``brats_fl.server.fedopt``), SCAFFOLD's global
  control variate (``brats_fl.server.scaffold``); the sequential jobs save the travelling model after every visit,
  with where the job stands in its meta (``brats_fl.server.sequential``);
- every site: its personal layers, optimiser state, Ditto's personal model, SCAFFOLD's c_i and the sampling state
  of its training loader after each round (``brats_fl.site.client``), in its state folder under the job's name. A
  site keeps two rounds: the server can die after a site has trained round r + 1 but before it has averaged that
  round, and the global model it kept is then of round r.

``resume_job`` turns the job folder that was submitted into the job that continues it: the same folder, with that
checkpoint bundled into the job (``custom/resume_global_model.pt``, read by FLARE's persistor as a relative
checkpoint, so the job works in the simulator, a POC and a provisioned deployment alike), the controller told
to start after the checkpoint's round (``DeadlineFedAvg(resume=True)``, which stops with a clear error if no round
is left; a sequential job after the checkpoint's visit), and every site told to continue from the state it kept
(``--resume``). The checkpoint comes from the server's disk (the job's folder stays there when the server process
dies) or, for a job that ended, from its downloaded result (``workspace/app_server/FL_global_model.pt``). Apart
from the bundled files, the result is the folder ``export_jobs`` writes for the same parameters with
``resume_from`` set (``tests/jobs/test_catalogue.py`` checks that). The HyperSeg, FedOpt and SCAFFOLD jobs bundle
their server state too. Every family resumes, and the resumed job ends with the model an uninterrupted run ends
with (``tests/integration/test_resume_poc.py``).
"""

from __future__ import annotations

import inspect
import json
import pickle
import shutil
from pathlib import Path

import torch
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from brats_fl.protocol import RESUME_FILE, SEQUENTIAL_META
from brats_fl.server.fedavg import rounds_left
from brats_fl.server.fedopt import FedOptController
from brats_fl.server.hyperseg import HyperSegController
from brats_fl.server.scaffold import ResumableScaffold
from brats_fl.server.state import ServerState

#: the controllers that keep server state beside the global model (``brats_fl.server.state``)
STATEFUL: tuple[type[ServerState], ...] = (FedOptController, HyperSegController, ResumableScaffold)
FEDOPT, HYPERSEG, SCAFFOLD = (f"{c.__module__}.{c.__qualname__}" for c in STATEFUL)
SEQUENTIAL = "brats_fl.server.sequential.SequentialTransfer"
#: the controllers that resume: True for those told ``resume`` (that start after the checkpoint's round), False for
#: those that find their state through ``resume_from`` alone
RESUMING = {
    "brats_fl.server.fedavg.DeadlineFedAvg": True,
    "brats_fl.server.segviz.SegVizFedAvg": True,
    SEQUENTIAL: True,
    FEDOPT: True,
    HYPERSEG: False,
    SCAFFOLD: False,
}
#: the server state, saved beside the global model after every round, that a controller resumes with too
SERVER_STATE = {f"{c.__module__}.{c.__qualname__}": (c.STATE_FILE, c.STATE_NAME) for c in STATEFUL}
PERSISTOR = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
EXECUTOR = "brats_fl.site.executor.SiteExecutor"


def _config(job: Path, side: str) -> tuple[Path, dict]:
    paths = list(job.glob(f"*/config/config_fed_{side}.json"))
    if len(paths) != 1:
        raise FileNotFoundError(f"{job}: not a job folder exported by brats-fl (no single config_fed_{side}.json)")
    return paths[0], json.loads(paths[0].read_text())


def _one(items: list[dict], paths: tuple[str, ...], where: Path) -> dict:
    found = [item for item in items if item.get("path") in paths]
    if len(found) != 1:
        raise ValueError(f"{where}: expected one of {paths}, found {len(found)}")
    return found[0]


def resume_job(job: Path, checkpoint: Path, out: Path) -> tuple[Path, int]:
    """Write into ``out`` the job that continues ``job`` after the round its server's last global model,
    ``checkpoint`` (a file on this machine), closed (a sequential job: after its last visit); returns the folder and
    that round. ``job`` may itself be a
    resumed job. ``out`` must not exist: nothing is overwritten."""
    job, checkpoint, out = Path(job), Path(checkpoint), Path(out)
    done = checkpoint_round(checkpoint)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new folder for the resumed job")
    server_path, server = _config(job, "server")
    client_path, client = _config(job, "client")
    controllers = [w["path"] for w in server["workflows"]]
    found = [w for w in server["workflows"] if w["path"] in RESUMING]
    if len(found) != 1:
        raise ValueError(f"{job}: its controllers {controllers} cannot resume (none of {list(RESUMING)})")
    controller = found[0]
    # FLARE's export leaves out an argument at its default: the controller's own default is the job's
    base = HyperSegController if controller["path"] == HYPERSEG else BaseFedAvg
    total = controller["args"].get("num_rounds", inspect.signature(base).parameters["num_rounds"].default)
    try:  # refused here, before anything is submitted
        rounds_left({"current_round": done}, total)
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from err
    if controller["path"] == SEQUENTIAL and SEQUENTIAL_META not in _meta(checkpoint):
        raise ValueError(f"{checkpoint}: not a sequential job's checkpoint (it records no visits)")
    bundle = {RESUME_FILE: checkpoint}
    _one(server["components"], (PERSISTOR,), server_path)["args"]["source_ckpt_file_full_name"] = RESUME_FILE
    if RESUMING[controller["path"]]:
        controller["args"]["resume"] = True
    if controller["path"] in SERVER_STATE:
        # the controller finds its state beside the checkpoint it is told to resume from
        controller["args"]["resume_from"] = RESUME_FILE
        name, what = SERVER_STATE[controller["path"]]
        bundle[name] = state = checkpoint.parent / name
        if not state.is_file():
            raise FileNotFoundError(f"{state}: a job of {controller['path']} resumes with its {what} state")
        if (saved := torch.load(state, map_location="cpu")["round"]) != done:
            raise ValueError(f"{state}: the {what} is of round {saved}, the global model of {done}")
    # every site goes on from what it kept (optimiser, sampling state, personal layers or statistics); a resumed job
    # interrupted in its turn has this set already and only needs the newer checkpoint
    _executor(client, client_path)["args"]["config"]["resume"] = True
    shutil.copytree(job, out)
    for path, doc in ((server_path, server), (client_path, client)):
        (out / path.relative_to(job)).write_text(json.dumps(doc, indent=4))
    # FLARE's persistor reads a relative checkpoint from the app's custom/ folder, which FLARE then counts as
    # custom code: a resumed job needs the byoc right (docs/howto/deploy.md)
    custom = out / server_path.relative_to(job).parent.parent / "custom"
    custom.mkdir(exist_ok=True)
    for name, source in bundle.items():
        shutil.copyfile(source, custom / name)
    return out, done


def _executor(client: dict, where: Path) -> dict:
    return _one([e["executor"] for e in client["executors"]], (EXECUTOR,), where)


def _meta(checkpoint: Path) -> dict:
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{checkpoint}: not a readable checkpoint ({err})") from err
    meta = saved.get("meta_props") if isinstance(saved, dict) else None
    return meta if isinstance(meta, dict) else {}


def checkpoint_round(checkpoint: Path) -> int:
    """The round a server's saved global model closed (-1: a sequential job saved mid-way through its first pass);
    a clear error for anything else."""
    done = _meta(checkpoint).get("current_round")
    if not isinstance(done, int):
        raise ValueError(f"{checkpoint}: records no completed round; is it a FLARE server's FL_global_model.pt?")
    return done


def resumes_after(checkpoint: Path) -> str:
    """Where a job resumed from ``checkpoint`` goes on, in words: after a round, or a sequential job's visit."""
    where = _meta(checkpoint).get(SEQUENTIAL_META)
    if isinstance(where, dict):
        return f"visit {where['visited']} of pass {where['pass']}"
    return f"round {checkpoint_round(checkpoint)}"
