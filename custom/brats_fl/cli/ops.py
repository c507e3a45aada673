"""``brats-fl site-policy`` and ``brats-fl poc ...``: FLARE workspaces on this machine (the work: ``brats_fl.ops``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brats_fl.cli import lazy

DEPLOY = "brats_fl.ops.deploy"


def _cmd_site_policy(args: argparse.Namespace) -> None:
    from brats_fl.ops.policy import install_policy

    print(f"{install_policy(args.workspace)}: FLARE may now build brats-fl's classes in this workspace")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``brats-fl site-policy`` and ``brats-fl poc prepare|start|submit|stop|clean``."""
    p = subparsers.add_parser(
        "site-policy", help="let a FLARE workspace (simulator, POC participant, startup kit) build brats-fl's classes"
    )
    p.add_argument("workspace", type=Path, help="e.g. runs/simulator, or a site's startup kit")
    p.set_defaults(func=_cmd_site_policy)

    poc = subparsers.add_parser("poc", help="a FLARE POC on this machine: prepare, start, submit, stop, clean")
    sub = poc.add_subparsers(dest="poc_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--workspace", type=Path, default=Path("workspace/poc"), help="POC workspace folder")
        p.set_defaults(func=lazy(DEPLOY, f"_cmd_{name}"))
        return p

    p = add("prepare", "startup kits for a server and N sites, each with its data configuration")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--port", type=int, default=8002, help="server port (FL and admin)")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist-dir", type=Path, required=True, help="holds <site>.json for every site")
    p.add_argument("--threads", type=int, default=None, help="torch threads per site")
    p.add_argument("--heartbeat-timeout", type=float, default=None, help="seconds until a silent site is dead")
    p = add("start", "start server and sites as background processes; wait until all are connected")
    p.add_argument("--timeout", type=float, default=300)
    p = add("submit", "submit a job folder with the admin kit, wait for it, download its result")
    p.add_argument("job", type=Path, help="a job folder, e.g. jobs/brats_fedavg")
    p.add_argument("--download", type=Path, default=Path("runs/poc"), help="where the result goes")
    p.add_argument("--timeout", type=float, default=6 * 3600)
    add("stop", "stop the processes that `brats-fl poc start` started")
    add("clean", "stop, then delete the POC workspace")
