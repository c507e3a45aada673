"""Post-processing's choice pooled over sites: the server's half of ``brats_fl.seg.postprocess`` (which says why).

With ``min_volume auto`` each site sends, with its last training result, its validation cases' per-candidate score sums
and case counts (``CHOICE_META``: ``Choice.to_dict``, aggregate figures like the validation Dice every round reports,
never a case). ``ChoiceCollector``, a server filter on training results, keeps each site's latest in
``postprocess_choices.json`` in the server's run folder; the controller that asks for the final test scores
(``brats_fl.server.personalise.PersonalisedEvaluation``, HyperSeg's) sends their sum with that task
(``POOLED_META``, ``pooled_meta``), and each site settles every region's volume
(``brats_fl.seg.postprocess.received_pool``, ``settle``).
No task is added: the figures ride on the training result the server collects anyway and on the final task it sends
anyway. The file stays as the run's record of what was pooled.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from brats_fl.protocol import CHOICE_META, CHOICES_FILE, POOLED_META
from brats_fl.seg.postprocess import Choice, pool


class ChoiceCollector(Filter):
    """A server-side filter on training results: keeps each site's latest validation choice (``CHOICE_META``) in
    ``<server run dir>/postprocess_choices.json``. It changes nothing in what it reads."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply holds no DXO
            return shareable
        if CHOICE_META not in dxo.meta:
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
        path = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / CHOICES_FILE
        kept = json.loads(path.read_text()) if path.is_file() else {}
        kept[site] = dxo.meta[CHOICE_META]
        path.write_text(json.dumps(dict(sorted(kept.items())), indent=1))
        return shareable


def pooled_meta(run_dir: str | Path) -> dict:
    """The final-scoring task's meta: the sum of the choices ``ChoiceCollector`` kept, and whose they are (``{}``
    where no site sent one: a job without ``min_volume auto``)."""
    path = Path(run_dir) / CHOICES_FILE
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if not kept:
        return {}
    pooled = pool(Choice.from_dict(doc) for doc in kept.values())
    rounds = {site: doc.get("round") for site, doc in kept.items()}
    return {POOLED_META: {"choice": pooled.to_dict(), "sites": sorted(kept), "rounds": rounds}}
