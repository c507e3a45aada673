"""The names that the sites, the server, the jobs and the results share: tasks, meta keys, and the files a run leaves.

They live on the ground floor so that a site need not import the server's modules, nor the results FLARE, only to
learn a name; FLARE keeps its own the same way (``nvflare.app_common.app_constant``). FLARE's own tasks (train,
validate, submit_model) and meta keys stay FLARE's. Plain strings and paths: imports nothing of brats-fl, torch or
FLARE.
"""

from __future__ import annotations

from pathlib import Path

# tasks a site answers besides FLARE's
#: after training: the site combines the final model with its personal layers, optionally fine-tunes it, and scores
#: and keeps it (``brats_fl.server.personalise``, HyperSeg's own personalisation)
PERSONALISE_TASK = "personalise"
#: a sequential job's validation of the travelling model at every site after each pass (``brats_fl.server.sequential``)
PASS_VALIDATION_TASK = "validate_pass"

# meta keys
#: a training task's: the rate every local epoch of the round trains at (``brats_fl.server.schedule``)
ROUND_LR = "round_lr"
#: a site's result's: what its DP-SGD has spent (``brats_fl.seg.dp.DPSGD.spent``, ``brats_fl.server.privacy``)
PRIVACY_META = "brats_fl_privacy"
#: a SegViz site's result's: the regions it annotates (``brats_fl.server.segviz``)
ANNOTATED_META = "annotated"
#: a sequential job's saved global model's: where the next visit stands (``brats_fl.server.sequential``)
SEQUENTIAL_META = "sequential"
#: a site's last training result: its validation cases' post-processing choice (``brats_fl.seg.postprocess.Choice``)
CHOICE_META = "brats_fl_postprocess_choice"
#: the final-scoring task: the sites' choices pooled (``brats_fl.server.postprocess.pooled_meta``)
POOLED_META = "brats_fl_postprocess_pooled"

# the server's run folder
#: what the run was and whether it completed (``brats_fl.server.run_record``)
RUN_RECORD = "brats_fl_run.json"
#: each site's scores of its own final model on its own test split (``brats_fl.server.personalise``)
PERSONALISED_RESULTS = Path("personalised") / "results.json"
#: a sequential job's visits and pass validations (``brats_fl.server.sequential``)
VISITS_FILE = Path("sequential") / "visits.json"
#: per site and round, what each privacy mechanism guarantees (``brats_fl.server.privacy``)
LEDGER_FILE = "privacy_ledger.jsonl"
#: per round, the updates' norms and the refused ones (``brats_fl.server.screening``)
SCREENING_FILE = "screening.jsonl"
#: per round, which sites each SegViz head came from (``brats_fl.server.segviz``)
HEADS_FILE = Path("segviz") / "heads.jsonl"
#: each site's latest post-processing choice, as the server kept it (``brats_fl.server.postprocess``)
CHOICES_FILE = "postprocess_choices.json"

# the server's app folder: the state a controller saves beside the global model every round and resumes with
SERVER_OPTIMIZER_FILE = "server_optimizer.pt"
HYPERNETWORK_FILE = "hypernetwork.pt"
SCAFFOLD_FILE = "scaffold_controls.pt"
#: an interrupted run's last global model, bundled into the custom folder of the job that continues it
#: (``brats_fl.jobs.resume``)
RESUME_FILE = "resume_global_model.pt"

# a site's folder of a job: ``<site workspace>/<job id>/SITE_FOLDER/``
SITE_FOLDER = "brats_fl"
#: one row per round: validation scores, learning rate, timings (``brats_fl.site.client``)
ROUNDS_FILE = "rounds.jsonl"
#: what the site is, runs and ran: its data, settings, personal keys, numerics (``brats_fl.site.client``)
SITE_RECORD = "site.json"
#: the site's final model, its personal layers included
SITE_MODEL_FILE = "personalised_model.pt"
#: written last, when the site's process ends the job
DONE_FILE = "done.json"
