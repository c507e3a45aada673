"""SegViz (Kanhere et al.): sites that annotate different regions train one multi-head model together.

The model (any network of ``brats_fl.seg.model`` with ``multi_head=True``) has a representation block, aggregated over
every site (FedAvg, or FedBN with its normalisation kept at the sites), and a task block with one head per region. A
site trains and sends only the heads of the regions it annotates (``brats_fl.site.client``) and declares those regions;
the server averages each head over the sites that sent it, weighted by their training cases, and a head that no
annotating site sent in a round keeps its previous value. With one annotating site per region this is the paper's rule:
the head is copied from the site that owns the task.

FLARE's FedAvg does not do this on its own, for two reasons. Its aggregation averages whatever keys a site sends,
trusting the site; here the server takes a head only from a site that declares its region. And it replaces the
global model by the round's aggregate, so a head that no site sent in a round would drop out of the global model;
the screening aggregator this one extends keeps it (``brats_fl.server.screening``), and refuses broken or
hostile updates as in the FedAvg jobs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.base_fedavg import _get_client_name

from brats_fl.protocol import ANNOTATED_META, HEADS_FILE
from brats_fl.server.fedavg import DeadlineFedAvg
from brats_fl.server.screening import ScreenedAggregator


class TaskHeadAggregator(ScreenedAggregator):
    """The FedAvg jobs' screened, case-weighted aggregation, in which a head counts only from a site that declares
    its region in the result's meta; another site's copy is dropped with a warning naming the site. Who gave each
    head is appended per round to ``segviz/heads.jsonl`` in the server's run folder."""

    def __init__(
        self,
        expected: dict[str, list[int]],
        head_keys: dict[str, list[str]],
        norm_ratio: float = 10.0,
        min_good: int = 1,
    ):
        super().__init__(expected, norm_ratio, min_good)
        self.head_keys = head_keys
        self.region_of = {k: r for r, keys in head_keys.items() for k in keys}
        self._foreign: dict[str, list[str]] = {}

    def reset_stats(self) -> None:
        super().reset_stats()
        self._foreign = {}

    def accept_model(self, model: FLModel) -> None:
        site = _get_client_name(model)
        annotated = set((model.meta or {}).get(ANNOTATED_META, []))
        foreign = sorted(k for k in model.params if self.region_of.get(k, None) not in (None, *annotated))
        if foreign:
            regions = sorted({self.region_of[k] for k in foreign})
            self.warning(f"{site} sent the head(s) of {regions}, which it does not annotate; those are ignored")
            self._foreign[site] = regions
            model.params = {k: v for k, v in model.params.items() if k not in foreign}
        super().accept_model(model)

    def aggregate_model(self) -> FLModel:
        result = super().aggregate_model()
        heads = {
            region: sorted(_get_client_name(m) for m in self._good if any(k in m.params for k in keys))
            for region, keys in self.head_keys.items()
        }
        for region, sites in heads.items():
            if not sites:
                self.info(f"round {self._round}: no site annotating {region} took part; its head is kept")
        run_dir = self.fl_ctx.get_engine().get_workspace().get_run_dir(self.fl_ctx.get_job_id())
        path = Path(run_dir) / HEADS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps({"round": self._round, "heads": heads, "foreign": self._foreign}) + "\n")
        return result


class SegVizFedAvg(DeadlineFedAvg):
    """The FedAvg jobs' controller (FLARE's FedAvg with a round deadline), given a ``TaskHeadAggregator``, with the
    sites of each round drawn from the job's seed."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        # *args and **kwargs let FLARE's job export find the parents' arguments (num_rounds, aggregator ...) too
        super().__init__(*args, **kwargs)
        self.seed = seed

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        """Sites of this round: FLARE draws them with Python's unseeded global random; here the job's seed and the
        round decide, so a run can be repeated."""
        clients = sorted(client.name for client in self.engine.get_clients())
        if num_clients and num_clients < len(clients):
            clients = sorted(random.Random(f"{self.seed}/{self.current_round}").sample(clients, num_clients))
        self.info(f"round {self.current_round}: sites {clients}")
        return clients
