"""The component policy a server or site sets when it installs brats-fl: which classes FLARE may build.

Since 2.8 FLARE builds only the components its ``class_allow_list`` (in ``<workspace>/local/resources.json``)
names, unless a job brings its own code (the ``byoc`` right). brats-fl jobs bring none: they name the installed
package's classes, so every participant that installs the package allows ``brats_fl.`` (a package prefix) and
the one FLARE class our jobs use that FLARE's default list lacks. Everything else stays as FLARE ships it.
"""

from __future__ import annotations

import json
from pathlib import Path

#: what brats-fl adds to FLARE's default allow-list: the package itself, and FLARE's PyTorch persistor
EXTRA_ALLOWED = ("brats_fl.", "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor")
CLASS_ALLOW_LIST = "class_allow_list"
RESOURCES = Path("local") / "resources.json"
AUTHORIZATION = Path("local") / "authorization.json"


def class_allow_list(existing: list[str] | None = None) -> list[str]:
    """FLARE's default allow-list (or a site's own, ``existing``) with what brats-fl jobs need added."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    base = list(DEFAULT_CLASS_ALLOW_LIST) if existing is None else list(existing)
    return base + [c for c in EXTRA_ALLOWED if c not in base]


def allowed(component: str, allow_list: list[str]) -> bool:
    """Whether FLARE's allow-list admits a component path: an exact class path, or a prefix ending in '.'."""
    return any(component == entry or (entry.endswith(".") and component.startswith(entry)) for entry in allow_list)


def install_policy(workspace: Path) -> Path:
    """Add brats-fl's classes to the allow-list of a FLARE workspace (a startup kit, a POC participant or a
    simulator workspace), keeping whatever else its ``local/resources.json`` holds."""
    path = Path(workspace) / RESOURCES
    default = path.with_name("resources.json.default")
    source = path if path.is_file() else default
    resources = json.loads(source.read_text()) if source.is_file() else {"format_version": 2}
    if not isinstance(resources, dict):
        raise ValueError(f"{source}: FLARE resources must be a JSON object")
    resources[CLASS_ALLOW_LIST] = class_allow_list(resources.get(CLASS_ALLOW_LIST))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resources, indent=2))
    return path


def deny_custom_code(kit: Path) -> Path:
    """Write a site's own ``local/authorization.json``: FLARE's provisioned policy with the ``byoc`` right taken
    from every role, so that the site runs only jobs that bring no code (brats-fl's own jobs) whoever submits them.

    A role granted everything (``"any"``) keeps every right the policy names, each with that condition.
    """
    path = Path(kit) / AUTHORIZATION
    policy = json.loads(path.with_name("authorization.json.default").read_text())
    roles = policy["permissions"]
    rights = {right for conf in roles.values() if isinstance(conf, dict) for right in conf}
    for role, conf in roles.items():
        granted = dict.fromkeys(rights, conf) if isinstance(conf, str) else dict(conf)
        roles[role] = granted | {"byoc": "none"}
    path.write_text(json.dumps(policy, indent=2))
    return path
