"""How ``brats_fl.ops.deploy.System`` starts a participant: with glibc's arena limit FLARE advises for its role, and
at the server a fixed mmap threshold, unless the environment sets them. A stand-in startup script records the
environment it was given; FLARE itself is started by the POC tests (tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from brats_fl.ops import deploy


def _kits(root: Path) -> Path:
    for name in ("server", "site-1"):
        startup = root / name / "startup"
        startup.mkdir(parents=True)
        (startup / "sub_start.sh").write_text('echo "$MALLOC_ARENA_MAX $MALLOC_MMAP_THRESHOLD_" > arena.txt\n')
    return root


def _arenas(kits: Path, env: dict[str, str]) -> dict[str, str]:
    system = deploy.System(kits, "server", deploy.POC_ADMIN, env=env)
    for name in ("server", "site-1"):
        system.start(name)
    for process in system.processes.values():
        process.wait(timeout=30)
    return {name: (kits / name / "arena.txt").read_text().strip() for name in ("server", "site-1")}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("4 65536", "2")),
        ({"MALLOC_ARENA_MAX": "8"}, ("8 65536", "8")),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, ("4 131072", "2 131072")),
    ],
)
def test_each_participant_starts_with_its_allocator_settings_unless_the_environment_sets_them(
    tmp_path: Path, env: dict, expected: tuple[str, str]
):
    arenas = _arenas(_kits(tmp_path), {"PATH": "/usr/bin:/bin"} | env)
    assert (arenas["server"], arenas["site-1"]) == expected
