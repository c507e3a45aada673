"""FLARE Client API script: a thin shell around the training loop, run at every site.

For each task from the server:
- ``train``: load the global weights (with ``recalibrate_stats``, HyperSeg Conv + BN, re-estimate the batch-norm
  statistics for them on the training data, as before every scoring), validate them on the site's validation split
  (reported to the server and to FLARE's tracking), train the configured local epochs, every one at the learning
  rate the task carries
  (``brats_fl.server.schedule``; a job whose server sends none, central or local-only, decays it per epoch), record
  that rate in ``rounds.jsonl``, send the weights back with the number of training cases as the aggregation weight;
- ``personalise`` (after training): combine the final global model with the site's personal layers,
  optionally fine-tune (at ``finetune_lr``), score on the site's own test split and keep that model;
- ``validate`` (cross-site evaluation): score the received model on the site's test split;
- ``validate_pass`` (sequential jobs, after each pass): score the received model on the validation split;
- ``submit_model`` (cross-site evaluation): send the site's shared weights.

What is scored after training (``personalise``, ``validate``) is the test split, or the validation split where the
job's ``final_split`` says so (``brats-fl tune``): the site then neither checks nor reads a test file.

FedProx, SCAFFOLD and Ditto (``brats_fl.site.algorithms``) change local training through the training loop's hooks:
FedProx and SCAFFOLD when a training task's meta asks for them (``fedprox_mu``, the SCAFFOLD control variate),
Ditto when the job gives ``ditto_lambda``; Ditto's personal model is then what ``personalise`` scores.

Personal keys (``--personal``, see ``brats_fl.server.personalise``) are never loaded from the server and
never sent. With partial labels and a multi-head model (SegViz, ``brats_fl.server.segviz``) the heads of
regions the site does not annotate are loaded but never sent, and every result declares the regions the site
annotates. ``all`` makes the local-only baseline, where every site trains alone; there, and only there,
cross-site evaluation receives each site's whole model, since that is what the baseline compares. The
site's data comes from its own configuration (``brats_fl.site.config``), never from the job. What the
site records stays at the site: ``<job id>/brats_fl/`` in its workspace for this run, and in its state folder
(see ``brats_fl.site.config``) what a resumed job needs: after every round, the personal layers, the optimiser
state, Ditto's personal model, SCAFFOLD's c_i and the training loader's sampling state, kept for the last
``KEEP_ROUNDS`` rounds (``brats_fl.jobs.resume`` says why two).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import nvflare.client as flare
import psutil
import torch
from nvflare.app_common.abstract.fl_model import FLMetaKey
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.client.tracking import SummaryWriter
from nvflare.fuel.data_event.data_bus import DataBus
from torch.utils.data import DataLoader

from brats_fl.data.checks import CHECKED
from brats_fl.data.datalist import SPLITS, load_datalist
from brats_fl.data.loading import eval_loader, load_sampling_state, sampling_state
from brats_fl.protocol import (
    ANNOTATED_META,
    CHOICE_META,
    DONE_FILE,
    PASS_VALIDATION_TASK,
    PERSONALISE_TASK,
    PRIVACY_META,
    ROUND_LR,
    ROUNDS_FILE,
    SITE_FOLDER,
    SITE_RECORD,
)
from brats_fl.seg.model import (
    describe_keys,
    fingerprint,
    head_keys,
    parameter_groups,
    personal_keys,
    save_whole,
    state_bytes,
)
from brats_fl.seg.postprocess import Choice, received_pool, settle
from brats_fl.seg.trainer import FINETUNE_SHARE, Trainer, config_from_args, make_train_loader
from brats_fl.settings import numerics
from brats_fl.settings.params import parse_min_volume, site_defaults
from brats_fl.site.algorithms import Ditto, FedProx, Scaffold
from brats_fl.site.config import resolve
from brats_fl.site.executor import CONFIG_KEY
from brats_fl.version import PACKAGE_DIR, running

#: rounds of site state kept: the server's last saved global model may be a round behind a site's last training
KEEP_ROUNDS = 2


def site_args(config: dict) -> argparse.Namespace:
    """The job's site configuration (``SiteExecutor``'s ``config``) over the defaults the parameter schema gives
    (``brats_fl.settings.params.site_defaults``); an unknown key is refused, naming it."""
    defaults = site_defaults()
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown site parameter(s) {unknown}; known: {sorted(defaults)}")
    return argparse.Namespace(**defaults | {k: v for k, v in config.items() if v is not None})


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _as_validation(metrics: dict) -> dict[str, float]:
    """Tracking names for scores on the validation split: ``dice_mean`` becomes ``val_dice_mean``."""
    return {k if k.startswith("val_") else f"val_{k}": v for k, v in _scalars(metrics).items()}


class Site:
    """One site's data, trainer and records; lives for the whole job so optimiser state persists."""

    def __init__(self, args: argparse.Namespace, name: str, workspace: Path, job_id: str):
        data = resolve(name, args.datalist, workspace=workspace)
        if args.threads is None:
            args.threads = data.threads
        self.args = args
        self.config = config_from_args(args, total_epochs=args.rounds * args.local_epochs)
        # runs the data checks: a site with bad data stops here, before any training, naming each file; a site being
        # tuned (final_split validation) leaves its test files unopened
        checked = [s for s in SPLITS if s != "test" or args.final_split == "test"]
        # a case that passed before on this site's disk (its cache folder) is not read again
        passed = data.cache_dir / CHECKED if data.cache_dir else None
        self.datalist = load_datalist(
            data.datalist, data.data_root, grid_required=self.config.spacing is None, checked=checked, passed=passed
        )
        self.trainer = Trainer(self.config)
        #: fine-tuning's constant rate: the job's, else a share of the initial one (not the decayed last rate)
        self.finetune_lr = args.finetune_lr or FINETUNE_SHARE * self.config.lr
        #: Ditto's personal model with its own optimiser; SCAFFOLD's state begins with the first task asking for it
        self.ditto = None
        if args.ditto_lambda is not None:
            folder = self._run_dir(workspace, job_id) / "ditto"
            self.ditto = Ditto(Trainer(self.config), folder, args.ditto_lambda, args.personal_epochs)
        self.scaffold: Scaffold | None = None
        #: the sites' post-processing choices pooled, as the final task brings them (``received_pool``)
        self.pooled: tuple[Choice | None, str] = (None, "")
        self.personal = set(personal_keys(self.trainer.model, args.personal))
        self.eval_personal = set() if args.personal == "all" else self.personal
        self.annotated = self.datalist.annotated()
        heads = head_keys(self.trainer.model) if self.trainer.model.multi_head else {}
        #: heads of regions this site does not annotate: it uses the federation's, and never sends its own
        self.unsent = self.personal | {k for r, keys in heads.items() if r not in self.annotated for k in keys}
        self.name = name
        self.run_dir = self._run_dir(workspace, job_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = data.state_dir / args.job
        self.record = {"site": name, "data": {k: str(v) for k, v in vars(data).items()}, "train": self.config.to_dict()}
        self.record["finetune_lr"] = self.finetune_lr
        self.record["final_split"] = args.final_split
        # the code this site runs: the installed package, or the job's own copy in a bundled job
        self.record["code"] = running() | {"package": str(PACKAGE_DIR)}
        # what decides its arithmetic: the same seed gives the same model only where this agrees
        self.record["numerics"] = numerics.describe()
        self.record["device"] = {"device": str(self.trainer.device), "amp": str(self.trainer.amp_dtype)}
        self.record["personal_keys"] = sorted(self.personal)
        #: what the site keeps, by layer: the names a reader checks against the network
        #: (``docs/explanation/networks.md``)
        self.record["personal_layers"] = describe_keys(self.trainer.model, sorted(self.personal))
        self.record["annotated"] = self.annotated
        #: the state to continue from is known at the first training task, which names the round
        self.to_resume = args.resume
        if not args.resume:
            # a new run of the job: what an earlier run kept must never be taken for this run's
            self.record["cleared_state"] = self._clear_state()
        self.cache_dir = data.cache_dir
        self.train = make_train_loader(self.datalist.items("training"), self.config, self.cache_dir)
        # scored every round, at the training grid (cheap); the test split on each case's own grid (``test``)
        self.val = eval_loader(self.datalist.items("validation"), self.cache_dir, spacing=self.config.spacing)
        self.writer = SummaryWriter()
        self._write_record()

    @staticmethod
    def _run_dir(workspace: Path, job_id: str) -> Path:
        return workspace / job_id / SITE_FOLDER

    def _write_record(self) -> None:
        (self.run_dir / SITE_RECORD).write_text(json.dumps(self.record, indent=1))

    def _state_file(self, rnd: int) -> Path:
        return self.state_dir / f"round_{rnd}.pt"

    def _kept_rounds(self) -> list[int]:
        found = self.state_dir.glob("round_*.pt") if self.state_dir.is_dir() else []
        return sorted(int(p.stem.removeprefix("round_")) for p in found)

    def _clear_state(self) -> list[str]:
        cleared = [self._state_file(r) for r in self._kept_rounds()]
        for path in cleared:
            path.unlink()
        return [str(p) for p in cleared]

    def _keep_state(self, rnd: int) -> None:
        """Keep what this site needs to go on after round ``rnd`` as if it had never stopped: its personal layers, its
        optimiser state and where its training loader stands in its random draws (patches, flips, order). Written
        whole or not at all (a site may die while writing); older rounds beyond ``KEEP_ROUNDS`` go."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"round": rnd, "personal": self.personal_state(), "trainer": self.trainer.state_dict()}
        state["sampling"] = sampling_state(self.train)
        if self.ditto:
            state["ditto"] = self.ditto.state_dict()
        if self.scaffold:
            state["scaffold"] = self.scaffold.state_dict()
        save_whole(state, self._state_file(rnd))
        for old in self._kept_rounds():
            if old <= rnd - KEEP_ROUNDS:
                self._state_file(old).unlink()

    def _resume_once(self, rnd: int | None) -> None:
        """At a resumed job's first task for this site: go on from what the site kept (``_resume``)."""
        if self.to_resume:
            self.record["resumed_from"] = self._resume(rnd)
            self.to_resume = False
            self._write_record()

    def _resume(self, rnd: int | None) -> dict:
        """Continue at round ``rnd`` with the personal layers, optimiser state and sampling state this site had after
        the last round before it that it trained (``rnd - 1``, unless a job that samples its sites left this site
        out); ``None``: after training, for a site that no round of the resumed job sampled."""
        if rnd == 0:  # a sequential job resumed in its first pass, at a site not yet visited in it
            return {"round": None, "fresh": "no round comes before round 0: starts as an uninterrupted run does"}
        kept = self._kept_rounds()
        before = [r for r in kept if rnd is None or r < rnd]
        if not before:
            raise FileNotFoundError(
                f"{self.state_dir}: {self.name} was asked to resume job {self.args.job}"
                f"{'' if rnd is None else f' at round {rnd}'}, but kept no state of an earlier round (it has rounds "
                f"{kept or 'none'})"
            )
        path = self._state_file(before[-1])
        state = torch.load(path, map_location="cpu")
        if set(state["personal"]) != self.personal:
            raise ValueError(f"{path}: holds other personal keys than this job's ({self.args.personal})")
        self.trainer.model.load_state_dict(state["personal"], strict=False)
        self.trainer.load_state_dict(state["trainer"])
        # a state kept before brats-fl saved it: the site then samples as at round 0 again, and says so
        if sampled := "sampling" in state:
            load_sampling_state(self.train, state["sampling"])
        if self.ditto:
            if "ditto" not in state:
                raise ValueError(f"{path}: holds no Ditto personal model, which this job's sites go on with")
            self.ditto.load_state_dict(state["ditto"])
        if "scaffold" in state:  # SCAFFOLD's own control variate c_i, which a site keeps for the whole job
            self.scaffold = Scaffold(self.trainer.model)
            self.scaffold.load_state_dict(state["scaffold"])
        record = {"file": str(path), "round": before[-1], "personal": fingerprint(state["personal"])}
        return record | {"sampling_restored": sampled}

    @functools.cached_property
    def final(self) -> DataLoader:
        """The split scored after training (``final_split``: test, or validation while tuning) on each case's own
        grid, cached on first use: only evaluation tasks need it."""
        return eval_loader(self.datalist.items(self.args.final_split), self.cache_dir)

    def load_global(self, params: dict, personal: set[str]) -> None:
        """Load every shared key; a personal key from the server is ignored, a missing shared key is an error."""
        state = self.trainer.model.state_dict()
        shared = {k: torch.as_tensor(v) for k, v in params.items() if k not in personal}
        missing = sorted(set(state) - personal - set(shared))
        if missing:
            raise KeyError(f"{self.name}: global model lacks shared key(s) {missing[:3]} ({len(missing)} in all)")
        self.trainer.model.load_state_dict(shared, strict=False)

    def recalibrate(self) -> dict[str, int]:
        """With ``recalibrate_stats`` (HyperSeg Conv + BN), the batch-norm running statistics re-estimated on this
        site's training patches for the weights just loaded: the server generates the normalisation layers' scale and
        shift afresh each round, and statistics of last round's weights would misnormalise every case in evaluation.
        Returns what the round's record keeps (nothing without the setting)."""
        if not self.args.recalibrate_stats:
            return {}
        return {"recalibrated_batches": self.trainer.recalibrate_norm(self.train)}

    def shared_state(self, personal: set[str]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.trainer.model.state_dict().items() if k not in personal}

    def personal_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.trainer.model.state_dict().items() if k in self.personal}

    def train_round(self, model: flare.FLModel) -> flare.FLModel:
        started_at = time.time()
        rnd = model.current_round or 0
        self._resume_once(rnd)
        recalibrated = {}
        if model.params:
            self.load_global(model.params, self.personal)
            recalibrated = self.recalibrate()
        if self.args.optimizer_state == "reset":
            self.trainer.reset_optimizer()
        # Dice and IoU only: HD95 on whole volumes cost as much as a round's training on the demo (surface distances of
        # an early model's scattered predictions), and no curve or model selection reads it; the test split has it.
        # In the last round, the same predictions also feed the post-processing choice the server pools
        choice = self._choice_to_pool(rnd)
        metrics = self.trainer.evaluate(self.val, distances=False, choice=choice)
        pooled = {CHOICE_META: choice.to_dict() | {"round": rnd}} if choice else {}
        # the round's rate from the server, for every local epoch; None: the trainer's own per-epoch schedule
        lr = (model.meta or {}).get(ROUND_LR)
        # Ditto's personal model trains first, towards the model just received
        algorithm = dict(recalibrated)
        if self.ditto:
            personal_started_at = time.time()
            algorithm["ditto"] = self.ditto.round(self.train, self.trainer.model, lr)
            algorithm["ditto"]["train_started_at"] = personal_started_at
        fedprox = FedProx.from_task(model, self.trainer.model)
        c_global = self._scaffold_start(model)
        after_step = self.scaffold.after_step if self.scaffold and c_global is not None else None
        before = self._dp_steps()
        train_started_at = time.time()
        stats = self.trainer.train_epochs(
            self.train, self.args.local_epochs, lr=lr, extra_loss=fedprox, after_step=after_step
        )
        extra_meta = self._privacy_meta(before)
        if extra_meta:
            algorithm["privacy"] = extra_meta[PRIVACY_META]
        if self.scaffold and c_global is not None:
            extra_meta |= self.scaffold.finish_round(self.trainer.model, self.trainer.optimizer.param_groups[0]["lr"])
            algorithm["scaffold"] = self._controls_record(rnd, c_global, extra_meta)
        if fedprox:
            algorithm["fedprox"] = {"mu": fedprox.mu, "proximal_term": stats["extra_loss"]}
        params = self.shared_state(self.unsent)
        sent = state_bytes(params)
        row = {"round": rnd, **_as_validation(metrics), **stats, "bytes_sent": sent}
        for key, value in row.items():
            if key != "round":
                self.writer.add_scalar(key, value, rnd)
        # fingerprints of what came in, what goes out and what stays: a sequential job's hand-over and a resumed
        # job's start can be checked exactly
        row |= {"received": fingerprint(model.params or {}), "sent": fingerprint(params)}
        row |= {"kept": fingerprint(self.personal_state()), "finished_at": time.time()} | algorithm
        # when the round's task began and its training steps did: what a run costs beyond training
        # (``brats_fl.results.cost``)
        row |= {"started_at": started_at, "train_started_at": train_started_at}
        with (self.run_dir / ROUNDS_FILE).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.trainer.save(self.run_dir / "local_model.pt", round=rnd, site=self.name)
        self._keep_state(rnd)
        if self.args.audit:
            torch.save(dict(model.params or {}), self.run_dir / f"received_round_{rnd}.pt")
            torch.save(params, self.run_dir / f"sent_round_{rnd}.pt")
        # the received model's validation scores, plus this round's training figures for the server's curves
        reported = _scalars(metrics) | {"train_loss": stats["train_loss"], "bytes_sent": float(sent)}
        n_cases = len(self.datalist.items("training"))
        return flare.FLModel(
            params=params,
            metrics=reported,
            meta={
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: n_cases,
                "steps": stats["steps"],
                "site": self.name,
                ANNOTATED_META: self.annotated,
                **extra_meta,
                **pooled,
            },
        )

    def _choice_to_pool(self, rnd: int) -> Choice | None:
        """With ``min_volume auto``, in the job's last round, an empty post-processing choice for this round's
        validation to fill and the server to pool (``brats_fl.seg.postprocess`` says why then); else None."""
        last = rnd >= self.args.rounds - 1
        return Choice(rule=self.args.lesion_rule) if last and self._chooses() else None

    def _chooses(self) -> bool:
        """``min_volume auto`` where it can choose: not while tuning (``final_split`` validation), whose scored split
        is the one it would choose on; a tuning trial's scores are then without post-processing."""
        return parse_min_volume(self.args.min_volume) == "auto" and self.args.final_split == "test"

    def _dp_steps(self) -> int:
        return self.trainer.dp.steps() if self.trainer.dp else 0

    def _privacy_meta(self, before: int) -> dict:
        """What DP-SGD has spent at this site, in all and since ``before`` steps, for the server's privacy ledger
        (``brats_fl.server.privacy``) and this site's rounds.jsonl; nothing without DP-SGD."""
        return {PRIVACY_META: self.trainer.dp.spent(since=before)} if self.trainer.dp else {}

    def _scaffold_start(self, model: flare.FLModel) -> dict[str, torch.Tensor] | None:
        """The server's SCAFFOLD control variate, taken from a training task that carries one (None if it does not);
        this site's SCAFFOLD state begins with the first such task and lasts the job."""
        if AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL not in (model.meta or {}):
            return None
        self.scaffold = self.scaffold or Scaffold(self.trainer.model)
        return self.scaffold.start_round(model.meta, self.trainer.model)

    def _controls_record(self, rnd: int, received: dict, meta: dict) -> dict:
        """SCAFFOLD's control variates of a round: the server's as received, and the change of this site's own as
        sent; fingerprints and norms in the record, the tensors too with ``audit``."""
        delta = meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]
        if self.args.audit:
            torch.save({"c_global": received, "c_delta": delta}, self.run_dir / f"controls_round_{rnd}.pt")

        def norm(state: dict) -> float:
            return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))

        return {
            "c_global": fingerprint(received),
            "c_global_norm": norm(received),
            "c_delta": fingerprint(delta),
            "c_delta_norm": norm(delta),
        }

    def personalise(self, model: flare.FLModel) -> flare.FLModel:
        """Final global + own personal layers (+ fine-tuning), scored on this site's test split and kept.

        With fine-tuning, the model before it is scored and kept too (``before_finetune_*``). The site's
        federated state is restored afterwards, so cross-site evaluation scores the model before fine-tuning.
        """
        self.record["personalise_started_at"] = time.time()
        self._resume_once(None)
        self.pooled = received_pool(model.meta)
        if self.ditto:
            return flare.FLModel(metrics=_scalars(self._score_and_keep("personalised", 0, self.ditto.trainer)))
        self.load_global(model.params, self.personal)
        self.recalibrate()
        federated = self._snapshot()
        epochs = self.args.finetune_epochs
        privacy: dict = {}
        if epochs:
            self._score_and_keep("before_finetune", epochs=0)
            trained = self._finetuned_keys()
            for key, param in self.trainer.model.named_parameters():
                param.requires_grad_(key in trained)
            before = self._dp_steps()
            started_at = time.time()
            stats = self.trainer.train_epochs(self.train, epochs, lr=self.finetune_lr)
            # training steps too, for the run's cost (``brats_fl.results.cost``)
            self.record["finetune_training"] = {"train_started_at": started_at, "train_time": stats["train_time"]}
            for param in self.trainer.model.parameters():
                param.requires_grad_(True)
            # fine-tuning under DP-SGD spends epsilon too: the ledger records it
            privacy = self._privacy_meta(before)
            if privacy:
                self.record["finetune_privacy"] = privacy[PRIVACY_META]
                self._write_record()
        metrics = self._score_and_keep("personalised", epochs=epochs)
        self.trainer.model.load_state_dict(federated)
        return flare.FLModel(metrics=_scalars(metrics), meta=privacy)

    def _finetuned_keys(self) -> set[str]:
        scope = self.args.finetune_scope
        if scope == "all":
            return set(self.trainer.model.state_dict())
        if scope == "heads":
            return set(parameter_groups(self.trainer.model)["head"])
        return self.personal

    def _score_and_keep(self, name: str, epochs: int, trainer: Trainer | None = None) -> dict:
        """Score the site's current model (or ``trainer``'s: Ditto's personal one) on its test split (``final``, which
        the file names as its ``split``); keep scores and model as ``<name>_test.json`` and ``<name>_model.pt``."""
        trainer = trainer or self.trainer
        volumes = self._min_volumes(trainer)
        metrics = trainer.evaluate(
            self.final, per_case=True, min_volume=volumes and volumes["volumes"], lesion_rule=self.args.lesion_rule
        )
        if volumes is not None:
            metrics["min_volume"] = volumes
            self.record.setdefault("min_volume", {})[name] = volumes
            self._write_record()
        scored = metrics | {"split": self.args.final_split}
        (self.run_dir / f"{name}_test.json").write_text(json.dumps(scored, indent=1))
        lr = self.finetune_lr if epochs else None
        trainer.save(self.run_dir / f"{name}_model.pt", site=self.name, finetune_epochs=epochs, finetune_lr=lr)
        return metrics

    def _min_volumes(self, trainer: Trainer) -> dict | None:
        """The job's post-processing (``brats_fl.seg.postprocess``): None, or ``{"volumes": {region: mm³}, "chosen":
        how}`` with volumes given, or chosen per region on this site's validation split for ``trainer``'s model, or
        pooled over the sites where the split is too small (``settle``: ``pooled`` names those regions, ``notes``
        the regions nothing could choose for)."""
        setting = parse_min_volume(self.args.min_volume)
        if setting == "none" or (setting == "auto" and not self._chooses()):
            return None
        if setting != "auto":
            return {"volumes": setting, "chosen": "given"}
        own = Choice(rule=self.args.lesion_rule)
        trainer.evaluate(self.val, distances=False, choice=own)
        pooled, pooled_over = self.pooled
        return settle(own, pooled, self.name, pooled_over)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.trainer.model.state_dict().items()}

    def evaluate(self, model: flare.FLModel, loader: DataLoader, distances: bool = True) -> dict:
        """Score a received model on one of this site's splits, then restore the site's own; without ``distances``,
        Dice and IoU alone (a validation split's curves)."""
        saved = self._snapshot()
        self.load_global(model.params, self.eval_personal)
        self.recalibrate()
        metrics = self.trainer.evaluate(loader, distances=distances)
        self.trainer.model.load_state_dict(saved)
        return _scalars(metrics)

    def validate_pass(self, model: flare.FLModel) -> flare.FLModel:
        """A sequential job's model after a pass, on the validation split; tracked as ``pass_val_*``."""
        metrics = self.evaluate(model, self.val, distances=False)
        for key, value in _as_validation(metrics).items():
            self.writer.add_scalar(f"pass_{key}", value, model.current_round)
        return flare.FLModel(metrics=metrics)


def _ended(run_dir: Path, start: float, reason: str | None) -> None:
    """Write ``done.json``: complete only where the site reached its final scoring (the personalise task, which every
    job sends last in training) and the run then ended without error; else the reason, so that no site of an aborted
    or failed run leaves a record that reads like success."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"complete": reason is None, "incomplete_reason": reason, "wall_time": time.perf_counter() - start}
    # the site process's start (its imports included) and end, for the run's cost (``brats_fl.results.cost``)
    record |= {"process_started_at": psutil.Process().create_time(), "ended_at": time.time()}
    (run_dir / DONE_FILE).write_text(json.dumps(record))


def main() -> None:
    args = site_args(DataBus().get_data(CONFIG_KEY))
    flare.init()
    run_dir = Site._run_dir(Path.cwd(), flare.get_job_id())
    start = time.perf_counter()
    personalised = False
    try:
        site = Site(args, flare.get_site_name(), Path.cwd(), flare.get_job_id())
        site.record["ready_at"] = time.time()
        site._write_record()
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if flare.is_train():
                flare.send(site.train_round(model))
            elif flare.get_task_name() == PERSONALISE_TASK:
                flare.send(site.personalise(model))
                personalised = True
                site.record["personalise_ended_at"] = time.time()
                site._write_record()
            elif flare.get_task_name() == PASS_VALIDATION_TASK:
                flare.send(site.validate_pass(model))
            elif flare.is_evaluate():
                flare.send(flare.FLModel(metrics=site.evaluate(model, site.final)))
            elif flare.is_submit_model():
                flare.send(flare.FLModel(params=site.shared_state(site.eval_personal)))
    except BaseException as err:  # recorded, then raised as it was: FLARE reports it
        _ended(run_dir, start, f"{type(err).__name__}: {err}")
        raise
    _ended(run_dir, start, None if personalised else "the job stopped before this site's final scoring (personalise)")


if __name__ == "__main__":
    main()
