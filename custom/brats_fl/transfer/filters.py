"""What crosses the wire between a site and the server: a manifest of every message, privacy and quantisation.

``TransferManifest`` is a FLARE filter that writes, for every message a site sends (``outgoing``, a task-result
filter) or receives (``incoming``, a task-data filter), one JSON line in the site's run folder
(``<job id>/brats_fl/outgoing.jsonl`` or ``incoming.jsonl``): the task, the round, the DXO kind, every entry's
key, type, shape, dtype and bytes, the type of every metric, meta and header entry (the text of a string, so
that a reviewer sees it), and the payload's bytes (those of all arrays and tensors, quantisation state
included). It changes nothing; placed last among the outgoing filters and first among the incoming ones, it
records exactly what travels. Numbers are never recorded, only their types.

``PRIVACY`` names FLARE's privacy filters that a job can put on its sites' training updates (see
docs/howto/privacy.md), and ``QUANTIZATION`` FLARE's quantisation types; the filters themselves are FLARE's (the
quantisers with a CPU path for 8 bits, ``brats_fl.transfer.quantization``).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.filters.exclude_vars import ExcludeVars
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy
from nvflare.app_opt.pt.quantization.constant import QUANTIZATION_TYPE

from brats_fl.protocol import SITE_FOLDER


class FreshNoiseSVTPrivacy(SVTPrivacy):
    """FLARE's ``SVTPrivacy``, its noise drawn from fresh entropy. FLARE's filter draws from NumPy's global
    generator, which MONAI's ``set_determinism`` seeds from the job's seed at every site (the client script runs in
    the FLARE client's process): the noise would follow a number written in the job. The generator's state is put
    back afterwards, so that training stays as reproducible as without the filter."""

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        saved = np.random.get_state()
        np.random.seed(np.frombuffer(secrets.token_bytes(16), dtype=np.uint32))
        try:
            return super().process_dxo(dxo, shareable, fl_ctx)
        finally:
            np.random.set_state(saved)


#: FLARE's privacy filters by the name a job option gives them (FLARE has no Gaussian-noise filter for weights)
PRIVACY = {"exclude": ExcludeVars, "percentile": PercentilePrivacy, "svt": FreshNoiseSVTPrivacy}
#: filters that read an update as a difference to the received model, so need ``transfer=diff``
ON_DIFFERENCES = ("percentile", "svt")
#: FLARE's quantisation types that a job may use. float4 and normfloat4 run on CUDA only (FLARE's filters move
#: tensors there; ``brats_fl.transfer.quantization`` runs blockwise8 on the CPU too). adaquant is left out:
#: FLARE 2.9 restores a tensor whose values span less than about 2e-4 (a normalisation bias after a round, say)
#: as NaN, dividing by its zero quantisation levels
QUANTIZATION = tuple(q.lower() for q in QUANTIZATION_TYPE if q != "ADAQUANT")
DIRECTIONS = ("outgoing", "incoming")


def describe(value: object) -> dict:
    """Type, shape, dtype and bytes of an array; the structure of a container; the text of a string."""
    if isinstance(value, torch.Tensor | np.ndarray):
        kind = "torch.Tensor" if isinstance(value, torch.Tensor) else "numpy.ndarray"
        return {"type": kind, "shape": list(value.shape), "dtype": str(value.dtype), "bytes": int(value.nbytes)}
    if isinstance(value, dict):
        return {"type": "dict", "items": {str(k): describe(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"type": type(value).__name__, "items": [describe(v) for v in value]}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes | bytearray):
        return {"type": type(value).__name__, "bytes": len(value)}
    return {"type": type(value).__name__}


def payload_bytes(description: dict) -> int:
    """The bytes of every array, tensor and byte string in a ``describe`` result."""
    items = description.get("items", {})
    inner = items.values() if isinstance(items, dict) else items
    return description.get("bytes", 0) + sum(payload_bytes(d) for d in inner)


class TransferManifest(Filter):
    """Record what a site sends (``outgoing``) or receives (``incoming``) in ``<run>/brats_fl/<direction>.jsonl``."""

    def __init__(self, direction: str = "outgoing"):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        row = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "round": shareable.get_header(AppConstants.CURRENT_ROUND),
            "return_code": shareable.get_return_code(),
            "headers": describe(shareable.get(ReservedHeaderKey.HEADERS, {})),
        }
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply holds no DXO
            row |= {"kind": None, "payload_bytes": 0}
        else:
            data, meta = describe(dxo.data), describe(dxo.meta)
            row |= {"kind": dxo.data_kind, "data": data, "meta": meta}
            row["payload_bytes"] = payload_bytes(data) + payload_bytes(meta)
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / SITE_FOLDER
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / f"{self.direction}.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return shareable
