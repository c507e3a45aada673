"""Personal layers: what stays at a site (FedPer, FedBN, local-only) and how personal models are judged.

One selection drives both sides of a job. A site never loads a personal key from the server and never
sends one, so the server's FedAvg only ever sees shared keys and averages exactly those; the global
model keeps its initial values for the personal keys, which no site ever loads. This holds for full and
for diff transfer alike: a key that is not sent has no diff either. (FLARE's ``exclude_vars`` alone is
not enough: it filters on the server only, after the personal weights have already left the site.)

Selections, on any of the networks (``brats_fl.seg.model.parameter_groups`` selects by module type, in the order
inference runs the layers): ``none`` (FedAvg), ``all`` (local-only baseline), ``head:N`` (FedPer: the last N
convolutions from the output, with their normalisation; with DynUNet its deep-supervision outputs too), ``norm`` (FedBN:
every normalisation key, the learnable scale and shift and, with batch norm, ``running_mean``, ``running_var`` and
``num_batches_tracked``), ``stats`` (batch norm's running statistics alone, as SiloBN keeps them; what the HyperSeg Conv
+ BN sites keep, since the hypernetwork generates only learnable tensors), or a sum of these, ``head:N+norm``.

``PersonalisedEvaluation`` runs after federated training: it sends the final global model to every site (with the
sites' post-processing choices pooled, ``brats_fl.server.postprocess``), which combines it with its personal layers,
optionally fine-tunes, and scores the result on its own test split. FLARE's cross-site evaluation cannot do this: it
scores one model on every site, whereas a personalised model exists only at its own site.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from brats_fl.protocol import PERSONALISE_TASK, PERSONALISED_RESULTS
from brats_fl.server.postprocess import pooled_meta


class PersonalisedEvaluation(ModelController):
    """Send the final global model to every site for personalisation and own-site testing; record the scores.

    Writes ``personalised/results.json`` in the server's run folder: ``{site: metrics}``. A site that fails is
    named in the log and missing from the file; the other sites' scores are kept.
    """

    def __init__(
        self,
        model_file: str = "FL_global_model.pt",
        timeout: int = 0,
        ignore_result_error: bool = True,
        task_check_period: float = 0.5,
        **kwargs,
    ):
        # task_check_period named here, not left in kwargs: FLARE's job export writes only the arguments it sees
        super().__init__(ignore_result_error=ignore_result_error, task_check_period=task_check_period, **kwargs)
        self.model_file = model_file
        self.timeout = timeout

    def run(self) -> None:
        # the persistor's file holds the last aggregated model; the persistor's own load_model would rebuild
        # the initial one
        blob = torch.load(Path(self.get_app_dir()) / self.model_file, map_location="cpu", weights_only=False)
        # with the sites' post-processing choices pooled, where they sent any (brats_fl.server.postprocess)
        task = FLModel(params=blob["model"], meta=pooled_meta(self.get_run_dir()))
        results = self.send_model_and_wait(task_name=PERSONALISE_TASK, data=task, timeout=self.timeout)
        scores = {r.meta.get("client_name", f"site-{i}"): r.metrics for i, r in enumerate(results, start=1)}
        missing = sorted(set(self.sample_clients()) - set(scores))
        if missing:
            self.warning(f"no personalised test scores from {missing}")
        path = Path(self.get_run_dir()) / PERSONALISED_RESULTS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores, indent=1))
        self.info(f"personalised test scores of {sorted(scores)} written to {path}")
