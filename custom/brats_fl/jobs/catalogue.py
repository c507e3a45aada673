"""Every FLARE job of brats-fl, defined once as a FLARE 2.9 recipe.

``export_jobs`` writes them into ``jobs/`` (committed, checked in sync by a test), where
``nvflare simulator``, ``nvflare job submit`` and the admin console take them; ``run_simulation`` executes
the same recipe in FLARE's ``SimEnv``. A job names no data path: each site reads its own configuration
(:mod:`brats_fl.site.config`). The client script and the model class come from this package, and FLARE's
export copies the modules they import into the job's ``custom/`` folder, so a site needs only nvflare,
torch, monai and nibabel.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import field, make_dataclass, replace
from typing import Any

from nvflare.apis.filter import Filter
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.job_config.model import PTModel
from nvflare.app_opt.pt.recipes import FedAvgRecipe
from nvflare.app_opt.pt.recipes.fedprox import FedProxRecipe
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.base_fed_job import BaseFedJob
from nvflare.recipe.spec import Recipe
from nvflare.recipe.utils import add_cross_site_evaluation, add_experiment_tracking

from brats_fl.drills.faults import FAULTS, FaultInjection
from brats_fl.drills.slow import SlowSite
from brats_fl.jobs.registry import get_job
from brats_fl.protocol import PASS_VALIDATION_TASK, PERSONALISE_TASK
from brats_fl.seg.dp import check_dp_model
from brats_fl.seg.model import DEFAULT_CHANNELS, BratsNet, build_model, head_keys, model_args, personal_keys
from brats_fl.seg.trainer import TrainConfig
from brats_fl.server.fedavg import DeadlineFedAvg
from brats_fl.server.fedopt import FedOptController
from brats_fl.server.hyperseg import VARIANTS, HyperSegController
from brats_fl.server.personalise import PersonalisedEvaluation
from brats_fl.server.postprocess import ChoiceCollector
from brats_fl.server.privacy import PrivacyLedger, check_budget, projected_epsilon
from brats_fl.server.run_record import RunRecord
from brats_fl.server.scaffold import ResumableScaffold
from brats_fl.server.screening import ScreenedAggregator, expected_shapes
from brats_fl.server.segviz import SegVizFedAvg, TaskHeadAggregator
from brats_fl.server.sequential import SequentialTransfer
from brats_fl.settings.params import HYPERNETWORK, KINDS, PARAMS, Param, by_name, unused
from brats_fl.site.executor import SiteExecutor
from brats_fl.transfer.filters import ON_DIFFERENCES, PRIVACY, TransferManifest
from brats_fl.version import running

#: the global model is ranked by the sites' mean validation Dice (WT, TC, ET) of the model they received
KEY_METRIC = "dice_mean"
#: the package every site and the server have installed; jobs name its components and carry no code of it
PACKAGE = "brats_fl"
#: FLARE's memory cleanup (gc.collect, then glibc's malloc_trim) every round: at each site after it sends, and at the
#: server of the FedAvg-based jobs after it aggregates. Without it a site's job process grew 10 % from round 20 to 200
#: of a POC run (docs/performance.md, "Many sites, long runs"); it costs milliseconds, against minutes of training
MEMORY_GC_ROUNDS = 1
#: local epochs of the _ft jobs after federated training
FINETUNE_EPOCHS = 2
#: FLARE's start-up waits, in every job's site configuration (FLARE reads them there first): how long a site's job
#: process tries to reach the server's job process before it gives up (FLARE's default 60 s, which seven jobs
#: started at once on 2 busy cores exceeded). Chosen from the waits measured on a loaded machine (docs/howto/deploy.md,
#: "Start-up waits"); only a server job process that is slow or dead to start makes a site wait this long
STARTUP_WAITS = {"max_runner_sync_timeout": 300.0}
#: every task a site answers. FLARE looks a filter up by exact task name (a filter's default task "*" matches
#: no task), so the transfer filters name them all
TRAIN_TASK = AppConstants.TASK_TRAIN
OTHER_TASKS = [PERSONALISE_TASK, PASS_VALIDATION_TASK, AppConstants.TASK_VALIDATION, AppConstants.TASK_SUBMIT_MODEL]
#: privacy filter arguments that must be positive numbers, and their upper bounds where they have one
_POSITIVE_ARGS = {"percentile": 100, "gamma": None, "fraction": 1, "epsilon": None, "noise_var": None}
_POSITIVE_ARGS |= {"epsilon_threshold": None, "epsilon_query": None, "epsilon_release": None}


def _fields(params: tuple[Param, ...]) -> list[tuple[str, Any, Any]]:
    """Dataclass fields of the schema's parameters: each with its default, a fresh dict where that is one."""
    fresh = {p.name: field(default_factory=dict) if p.type is dict else field(default=p.default) for p in params}
    return [(p.name, p.type, fresh[p.name]) for p in params]


def _require(ok: bool, what: str) -> None:
    """Refuse a job parameter out of range before anything is built or sent to a site."""
    if not ok:
        raise ValueError(f"job parameter out of range: need {what}")


class _HyperNet:
    """The HyperSeg jobs' hypernetwork (``brats_fl.settings.params.HYPERNETWORK``). ``warmup_rounds`` of plain FedAvg
    on all weights come first; the hypernetwork starts from them."""

    def __post_init__(self) -> None:
        for p in HYPERNETWORK:
            p.validate(getattr(self, p.name))


HyperNetParams = make_dataclass("HyperNetParams", _fields(HYPERNETWORK), bases=(_HyperNet,))
HyperNetParams.__doc__ = _HyperNet.__doc__


class _Job:
    """What a user tunes per run (``brats_fl.settings.params.PARAMS`` says each parameter, its default and its rule);
    defaults finish the README demo on 2 CPU cores in about 15 minutes.

    ``personal``, ``finetune_epochs`` and ``norm`` left as None take the job's own choice (FedPer keeps ``head:2``
    at the site, FedBN ``norm``; the ``_ft`` jobs fine-tune for 2 epochs; the FedBN and HyperSeg Conv + BN jobs
    use batch norm, every other job instance norm). ``lr`` and ``momentum`` left as None take the recipe's,
    ``finetune_lr`` a tenth of the initial rate; the server sends each round's rate (``brats_fl.server.schedule``).
    ``resume_from`` names an interrupted run's last global model on the server: the job continues after the round
    it closed, up to ``rounds`` in all, and every site from the state it kept after that round
    (``brats_fl.jobs.resume``).
    ``transfer`` is FLARE's: ``full`` weights or the ``diff`` to the received ones.

    Sequential jobs (cyclic, single weight transfer) make ``passes`` trips around the sites (None: the job's
    own, 2 or 1), visiting them in a ``fixed`` or ``shuffle``d order; each visit trains ``visit_epochs``
    epochs, by default ``rounds * local_epochs / passes``, so that every site trains as many epochs as in
    FedAvg with the same parameters. A visit is skipped when the site has not picked it up after
    ``assignment_timeout`` seconds or not finished it after ``visit_timeout``.

    What crosses the wire (docs/howto/privacy.md): every job's server but SCAFFOLD's refuses an update with NaN or
    infinite values, foreign keys or shapes, or a norm over ``norm_ratio`` times the median of the round's other updates
    (a sequential job's: of the earlier visits'), and a job that averages stops rather than average a round with
    fewer than ``min_good`` good updates (``brats_fl.server.screening``). ``privacy`` puts one of FLARE's
    privacy filters (``exclude``, ``percentile``, ``svt``) with ``privacy_args`` on every site's training
    updates; ``quantize`` makes FLARE's quantisation filters shrink every model on its way in both directions;
    ``audit_transfer`` has every site record a manifest of each message it sends and receives
    (``brats_fl.transfer.filters``).
    ``faults`` is a drill, ``{"site-2": ["nan", "none", "scale"]}``: that site sends the given broken update
    in rounds 0, 1, 2 (kinds in ``brats_fl.drills.faults.FAULTS``).

    Stragglers (docs/howto/deploy.md, ``brats_fl.server.fedavg``): a FedAvg job's round waits for every site
    unless ``min_responses`` is set; then it closes ``round_wait`` seconds after that many sites have answered,
    with the updates that came, and the job stops if a round ends with fewer answers. ``round_timeout`` ends a round
    that many seconds after it began whoever has answered (a site whose process hangs): short of ``min_responses``
    answers (of every site, without it) the job stops, naming the sites; HyperSeg's rounds too, which need every site.
    The evaluation after training waits ``eval_timeout`` seconds for a site, by default ``round_timeout``.
    ``delays`` is a drill, ``{"site-3": 20}``: that site holds each training update 20 s before sending it.
    """

    def __post_init__(self) -> None:
        for p in PARAMS:
            p.validate(getattr(self, p.name))
        # what no single parameter can say on its own
        channels, patch = self.channels or DEFAULT_CHANNELS[self.network], self.patch_size
        levels = 2 ** (len(channels) - 1)
        _require(all(p % levels == 0 for p in patch), f"patch sizes multiples of {levels}, got {patch}")
        try:
            model_args(self.network, channels, self.norm)
        except ValueError as err:
            raise ValueError(f"job parameter out of range: {err}") from err
        _require(self.hypernetwork.warmup_rounds < self.rounds, f"warmup_rounds < rounds ({self.rounds})")
        per_round = self.clients_per_round or self.sites
        _require(per_round <= self.sites, f"clients_per_round <= sites ({self.sites}), got {per_round}")
        _require(self.min_good <= self.sites, f"1 <= min_good <= sites ({self.sites}), got {self.min_good}")
        ok = self.min_responses is None or self.min_responses <= self.sites
        _require(ok, f"1 <= min_responses <= sites ({self.sites}), got {self.min_responses}")
        self._check_privacy()
        self.train_settings()  # refuses what the recipe cannot take (a momentum for Adam)
        kinds = {f for plan in self.faults.values() for f in plan}
        _require(kinds <= set(FAULTS), f"faults among {FAULTS}, got {sorted(kinds)}")

    def _check_privacy(self) -> None:
        name, args = self.privacy, self.privacy_args
        if self.dp_epsilon is None:
            unset = self.dp_delta == by_name("dp_delta").default and self.dp_clip == by_name("dp_clip").default
            _require(unset, "dp_epsilon with dp_delta or dp_clip: they are DP-SGD's")
        else:
            _require(self.amp != "on", "amp off or auto with DP-SGD, which clips per-case gradients in full precision")
        # a site's answer to cross-site evaluation is its whole model, which no wire filter can filter and keep
        # scorable: under a filter, only DP-SGD (whose guarantee covers every model a site trains) may send it
        whole = f"cross_site global or none with privacy {name!r}: 'all' sends each site's whole model, unfiltered"
        _require(name == "none" or self.cross_site != "all", whole)
        if name == "none":
            _require(not args, f"no privacy_args without a privacy filter, got {args}")
            return
        # FLARE's filters check few of their arguments, some only when the first update arrives, and
        # PercentilePrivacy quietly does nothing with a percentile out of range
        allowed = set(inspect.signature(PRIVACY[name]).parameters) - {"data_kinds"}
        _require(set(args) <= allowed, f"privacy_args of {name} among {sorted(allowed)}, got {sorted(args)}")
        for key, high in _POSITIVE_ARGS.items():
            value = args.get(key, 1)
            ok = isinstance(value, int | float) and value > 0 and (high is None or value <= high)
            _require(ok, f"{key} > 0{f' and <= {high}' if high else ''}, got {value!r}")
        if name == "exclude":
            _require(isinstance(args.get("exclude_vars"), str), "privacy_args exclude_vars, a regular expression")
        reads_diff = f"transfer 'diff' with privacy {name!r}: FLARE's filter takes what a site sends for a difference"
        _require(name not in ON_DIFFERENCES or self.transfer == "diff", reads_diff)

    def train_settings(self) -> TrainConfig:
        """The training settings of the job's recipe with the rate and momentum the user set (None: the recipe's)."""
        return TrainConfig.from_dict({"recipe": self.recipe, "lr": self.lr, "momentum": self.momentum})

    def round_lr(self) -> dict[str, Any]:
        """The controller's arguments for the sites' learning rate per round (``brats_fl.server.schedule``)."""
        settings = self.train_settings()
        return {"lr": settings.lr, "lr_schedule": settings.lr_schedule}

    def client_config(self) -> dict[str, Any]:
        """What every site of the job is told: its training parameters, as structured configuration
        (``brats_fl.site.client``)."""
        return {p.site: p.to_site(getattr(self, p.name)) for p in PARAMS if p.site}

    def model(self, multi_head: bool = False) -> BratsNet:
        """The job's initial global model (``brats_fl.seg.model.model_args``: the network's own channels and
        normalisation where the job sets none)."""
        return build_model(model_args(self.network, self.channels, self.norm, multi_head, init_seed=self.seed))


JobParams = make_dataclass(
    "JobParams",
    [*_fields(PARAMS), ("hypernetwork", HyperNetParams, field(default_factory=HyperNetParams))],
    bases=(_Job,),
)
JobParams.__doc__ = _Job.__doc__
# make_dataclass names the module "types" on Python 3.11 (its ``module`` argument is 3.12's), and pickle, which
# sends the parameters to the simulator's child process (brats_fl.jobs.simulate), finds classes by module
JobParams.__module__ = HyperNetParams.__module__ = __name__


def _fedavg(
    name: str,
    params: JobParams,
    sites: int,
    personal: str = "none",
    finetune: tuple[int, str] = (0, "all"),
    datalist: str | None = None,
    multi_head: bool = False,
    partial_labels: str | None = None,
    controller: tuple[type[DeadlineFedAvg], dict[str, Any]] = (DeadlineFedAvg, {}),
    site: dict[str, Any] | None = None,
    recipe_class: type[DeadlineFedAvgRecipe] | None = None,
    **recipe_args: Any,
) -> FedAvgRecipe:
    """FLARE's FedAvg (case-weighted, in-time aggregation) over the keys the sites share, the best and last
    global model, then personalisation and own-site testing, then FLARE's cross-site evaluation.

    ``controller`` is the server's class and its own arguments (FedAvg's, or FedOpt's server step); ``site`` adds
    to what the sites are told; ``recipe_class`` (with ``recipe_args``) replaces ``DeadlineFedAvgRecipe``."""
    client = params.client_config() | {
        "job": name,
        "personal": personal,
        "finetune_epochs": finetune[0],
        "finetune_scope": finetune[1],
        "datalist": datalist,
        "multi_head": multi_head,
        "partial_labels": partial_labels,
    }
    client |= site or {}
    model = params.model(multi_head=multi_head)
    # the central baselines have a single site, whatever min_good and min_responses say
    screen = ScreenedAggregator(expected_shapes(model.state_dict()), params.norm_ratio, min(params.min_good, sites))
    # without federation (pooled data, or every site alone) the sites decay the rate per epoch themselves
    federated = datalist is None and personal != "all"
    recipe = (recipe_class or DeadlineFedAvgRecipe)(
        min_responses=min(params.min_responses, sites) if params.min_responses else None,
        round_wait=params.round_wait,
        round_timeout=params.round_timeout or 0,
        resume=bool(params.resume_from),
        controller=(controller[0], controller[1] | (params.round_lr() if federated else {})),
        name=name,
        model=model,
        initial_ckpt=params.resume_from,
        min_clients=sites,
        num_rounds=params.rounds,
        client=client,
        train_script=SiteExecutor.__module__,
        server_expected_format=ExchangeFormat.PYTORCH,
        params_transfer_type=TransferType(params.transfer.upper()),
        key_metric=KEY_METRIC,
        key_metric_mode="max",
        aggregator=screen,
        server_memory_gc_rounds=MEMORY_GC_ROUNDS,
        **recipe_args,
    )
    _with_transfer_filters(recipe, params, model)
    return _with_evaluation(recipe, params, client)


class DeadlineFedAvgRecipe(FedAvgRecipe):
    """FLARE's PyTorch FedAvg recipe with ``DeadlineFedAvg`` (or its FedOpt subclass) for its controller, which
    FedAvgRecipe builds in its constructor through ``_create_controller`` and offers no way to give a minimum of
    answers, a wait, a resumption, the round's learning rate or a server optimiser. (FLARE's FedOptRecipe builds a
    ScatterAndGather workflow with FLARE's script runner; ``brats_fl.server.fedopt`` says why it is not used.)"""

    def __init__(
        self,
        *,
        min_responses: int | None,
        round_wait: int,
        round_timeout: int,
        resume: bool,
        controller: tuple[type[DeadlineFedAvg], dict[str, Any]],
        client: dict[str, Any],
        **kwargs: Any,
    ):
        # set before FedAvgRecipe's constructor, which calls _create_controller
        self.min_responses = min_responses
        self.round_wait = round_wait
        self.round_timeout = round_timeout
        self.resume = resume
        self.controller = controller
        self.client = client
        super().__init__(**kwargs)
        self._job.set_app_packages([PACKAGE])

    def _create_client_runner(self, site_config: dict) -> SiteExecutor:
        # the installed package's executor in place of FLARE's ScriptRunner, which would copy a script into the
        # job's custom/ folder (brats_fl.site.executor says why); ``train_script`` above only names its module
        return SiteExecutor(
            self.client,
            expects=running(),
            transfer=self.params_transfer_type.value.lower(),
            memory_gc_rounds=MEMORY_GC_ROUNDS,
        )

    def _create_controller(
        self, persistor_id: str, model_params: dict | None, model_aggregator: ModelAggregator | None
    ) -> FedAvg:
        # FLARE 2.9's FedAvgRecipe._create_controller, with our class and its arguments; a difference in
        # FedAvg's arguments would show in the exported jobs (tests/test_jobs.py)
        controller, args = self.controller
        return controller(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name=TRAIN_TASK,
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            min_responses=self.min_responses,
            round_wait=self.round_wait,
            round_timeout=self.round_timeout,
            resume=self.resume,
            task_check_period=TASK_CHECK_PERIOD,
            **args,
            **self._get_controller_kwargs(),
        )


class DeadlineFedProxRecipe(DeadlineFedAvgRecipe, FedProxRecipe):
    """FLARE's FedProx recipe (its controller puts ``fedprox_mu`` in every training task's meta; the sites add the
    proximal term, ``brats_fl.site.algorithms``) with ``DeadlineFedAvgRecipe``'s executor and controller, which takes
    FedProx's controller arguments from ``FedProxRecipe._get_controller_kwargs``."""


def _with_transfer_filters(recipe: Recipe, params: JobParams, model: BratsNet) -> None:
    """FLARE's filters on what crosses the wire, in the order they act (``JobParams``, docs/howto/privacy.md).

    A site's training update meets the drills' delay and fault, then the privacy filter, then quantisation, then the
    manifest, which so records what actually leaves; an incoming task is recorded before it is dequantised.
    Privacy acts on training updates only, as in FLARE's examples: a site's model submitted for cross-site
    evaluation must stay whole to be scored elsewhere.
    """
    entries = sum(v.numel() for v in model.state_dict().values())
    projected = projected_epsilon(params.privacy, params.privacy_args, params.dp_epsilon, params.rounds, entries)
    check_budget(params.privacy_budget, projected, _mechanisms(params))
    if params.dp_epsilon is not None:
        check_dp_model(model.norm)
    quantize = params.quantize != "none"
    if quantize:
        # bitsandbytes, which FLARE's quantisation filters import, is needed only by a job that quantises
        from brats_fl.transfer.quantization import Dequantizer as ModelDequantizer
        from brats_fl.transfer.quantization import Quantizer as ModelQuantizer

        # as FLARE's quantisation examples: quantise what leaves either side, restore it where it arrives
        recipe.add_server_output_filter(ModelQuantizer(params.quantize), tasks=[TRAIN_TASK, *OTHER_TASKS])
        recipe.add_server_input_filter(ModelDequantizer(), tasks=[TRAIN_TASK, *OTHER_TASKS])
    for tasks in ([TRAIN_TASK], OTHER_TASKS):
        training = tasks == [TRAIN_TASK]
        incoming: list[Filter] = [TransferManifest("incoming")] if params.audit_transfer else []
        outgoing: list[Filter] = [SlowSite(params.delays)] if params.delays and training else []
        if params.faults and training:
            outgoing.append(FaultInjection(params.faults))
        if params.privacy != "none" and training:
            outgoing.append(_privacy_filter(params, model))
        if quantize:
            incoming.append(ModelDequantizer())
            outgoing.append(ModelQuantizer(params.quantize))
        if params.audit_transfer:
            outgoing.append(TransferManifest("outgoing"))
        for f in incoming:
            recipe.add_client_input_filter(f, tasks=tasks)
        for f in outgoing:
            recipe.add_client_output_filter(f, tasks=tasks)
    # every job's server keeps the privacy ledger of the sites' training and personalisation results. FLARE allows one
    # filter chain per set of tasks, and a chain of several tasks is exported in the order of a Python set (which
    # changes from run to run): one chain per task, unless the dequantiser already chains every task
    ledger = (params.privacy, params.privacy_budget)
    for tasks in [[TRAIN_TASK, *OTHER_TASKS]] if quantize else [[TRAIN_TASK], [PERSONALISE_TASK]]:
        recipe.add_server_input_filter(PrivacyLedger(*ledger), tasks=tasks)
    # the sites' post-processing choices, from their last training results, pooled for the final task
    recipe.add_server_input_filter(ChoiceCollector(), tasks=[TRAIN_TASK, *OTHER_TASKS] if quantize else [TRAIN_TASK])


def _mechanisms(params: JobParams) -> str:
    """The job's privacy mechanisms in words, for a refusal."""
    parts = [f"DP-SGD at epsilon {params.dp_epsilon:g}"] if params.dp_epsilon is not None else []
    parts += [f"privacy {params.privacy!r}"] if params.privacy != "none" or not parts else []
    return " with ".join(parts)


def _privacy_filter(params: JobParams, model: BratsNet) -> Filter:
    """The FLARE privacy filter of ``params``. ExcludeVars gets the list of keys its regular expression matches:
    FLARE's filter compiles an expression in its constructor, and FLARE's job export cannot write that back."""
    args = dict(params.privacy_args)
    if params.privacy == "exclude":
        pattern = re.compile(args["exclude_vars"])
        args["exclude_vars"] = [k for k in model.state_dict() if pattern.search(k)]
        if not args["exclude_vars"]:
            raise ValueError(f"exclude_vars {pattern.pattern!r} matches no key of the model")
    return PRIVACY[params.privacy](**args)


def _eval_timeout(params: JobParams) -> int:
    """Seconds the evaluation after training waits for a site: ``eval_timeout``, else the job's round timeout, else
    no limit (FLARE's 0), as the rounds have none: never a fixed wait of hours."""
    return params.eval_timeout or params.round_timeout or 0


def _with_evaluation(recipe: Recipe, params: JobParams, client: dict, personalise: bool = True) -> Recipe:
    """What every job adds after training: tracking, each site's own-test scores, cross-site evaluation, and
    the run record. ``client`` is what the sites are told; ``personalise=False`` for a controller that sends each site
    its own final model itself.

    Cross-site evaluation (``cross_site``): ``all`` is FLARE's ``add_cross_site_evaluation``, which scores the
    server's models (last and best global) and every site's submitted model on every site's test split; ``global``
    scores the server's models alone, with the same FLARE components but no ``submit_model`` task (FLARE's
    ``CrossSiteModelEval`` sends none when its task name is empty): 2 models per site instead of 2 + sites; ``none``
    leaves it out, where each site's own final model on its own test split is all a run must say (a benchmark);
    ``auto`` (``cross_site_mode``) is ``global`` where that differs from the federation's model, else ``none``: each
    validate task scores a whole test split again, which cost a tiny simulation about 18 s and the demo minutes."""
    # every site's SummaryWriter scalars arrive at the server's TensorBoard folder (tb_events/<site>)
    add_experiment_tracking(recipe, "tensorboard")
    # how long a site waits after each task before it asks for the next: FLARE's 2 s left every site idle for up to
    # 2 s at every round and every evaluation task, 40 s of a 20-round demo; asking every half second costs nothing
    recipe._job._deploy_map["server"].add_params({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
    if personalise:
        evaluation = PersonalisedEvaluation(timeout=_eval_timeout(params), task_check_period=TASK_CHECK_PERIOD)
        recipe._job.to_server(evaluation, id="personalised_evaluation")
    mode = cross_site_mode(params.cross_site, client)
    if mode == "all":
        timeouts = {"submit_model_timeout": _eval_timeout(params), "validation_timeout": _eval_timeout(params)}
        add_cross_site_evaluation(recipe, **timeouts)
    elif mode == "global":
        # add_cross_site_evaluation's components (nvflare.recipe.utils), with the submit_model task left out
        locator = recipe._job.to_server(PTFileModelLocator(pt_persistor_id=recipe._job.comp_ids["persistor_id"]))
        recipe._job.to_server(ValidationJsonGenerator())
        evaluation = CrossSiteModelEval(
            model_locator_id=locator,
            submit_model_task_name="",
            submit_model_timeout=_eval_timeout(params),
            validation_timeout=_eval_timeout(params),
        )
        recipe._job.to_server(evaluation)
    # what the run was (configuration, seeds, versions, code, wall time), next to its results on the server
    recipe._job.to_server(RunRecord(expects=running()), id="run_record")
    return recipe


#: seconds a site waits after a task before it asks the server for the next (FLARE's ``task_request_interval``,
#: whose default is 2 s); the client's own wait when the server has nothing for it is FLARE's 0.5 s already
TASK_REQUEST_INTERVAL = 0.5
#: seconds between a controller's looks at whether its sites have answered (FLARE's ``task_check_period``, 0.5 s):
#: the server's side of the same wait, at every round and every evaluation task; a look costs microseconds
TASK_CHECK_PERIOD = 0.1


def cross_site_mode(setting: str, client: dict) -> str:
    """The cross-site evaluation a job runs: ``setting`` itself, or for ``auto`` ``global`` where each site ends with
    another model than the federation's (it fine-tunes, or trains Ditto's personal model), since only then does
    scoring the server's model say something the sites' own scores do not, and ``none`` otherwise."""
    if setting != "auto":
        return setting
    diverges = bool(client.get("finetune_epochs")) or client.get("ditto_lambda") is not None
    return "global" if diverges else "none"


class ControllerRecipe(Recipe):
    """A FLARE job whose server runs one of our controllers (``brats_fl.algorithms``), with FLARE's PyTorch
    persistor and our client script. FLARE's recipes each come with their own controller, so the sequential
    and hypernetwork jobs are assembled here from the same FLARE parts."""

    framework = FrameworkType.PYTORCH

    def __init__(
        self,
        name: str,
        params: JobParams,
        controller: ModelController,
        client: dict[str, Any],
        model: BratsNet | None = None,
    ):
        if params.transfer != "full":
            raise ValueError(f"{name}: sites return whole models; transfer must be 'full', not {params.transfer!r}")
        if not isinstance(controller, DeadlineFedAvg):
            timed = isinstance(controller, HyperSegController)
            for key in ("min_responses",) if timed else ("min_responses", "round_timeout"):
                if getattr(params, key) is not None:
                    raise ValueError(f"{name} runs its own controller; {key} is for the FedAvg-based jobs")
        # no model selector: what a site reports is not always the score of the model the server keeps
        job = BaseFedJob(name=name, min_clients=params.sites, key_metric="")
        persistor = PTModel(
            model=model or params.model(), initial_ckpt=params.resume_from, allow_numpy_conversion=False
        )
        job.comp_ids.update(job.to_server(persistor, id="persistor"))
        job.to_server(controller, id="controller_" + name.removeprefix("brats_"))
        job.set_app_packages([PACKAGE])
        job.to_clients(SiteExecutor(client | {"job": name}, expects=running(), memory_gc_rounds=MEMORY_GC_ROUNDS))
        super().__init__(job)
        _with_transfer_filters(self, params, model or params.model())


def _sequential(name: str, params: JobParams, passes: int) -> Recipe:
    """The model visits one site after the other, ``passes`` times (see ``brats_fl.server.sequential``)."""
    if params.min_good != 1:
        raise ValueError(f"{name}: min_good is for jobs that average a round; a visit's update is screened alone")
    epochs = params.visit_epochs or max(1, params.rounds * params.local_epochs // passes)
    controller = SequentialTransfer(
        num_clients=params.sites,
        num_rounds=passes,
        order=params.order,
        seed=params.seed,
        assignment_timeout=params.assignment_timeout,
        visit_timeout=params.visit_timeout,
        norm_ratio=params.norm_ratio,
        resume=bool(params.resume_from),
        task_check_period=TASK_CHECK_PERIOD,
        **params.round_lr(),
    )
    client = params.client_config() | {"rounds": passes, "local_epochs": epochs}
    return _with_evaluation(ControllerRecipe(name, params, controller, client), params, client)


def cyclic(params: JobParams) -> Recipe:
    """Cyclic weight transfer: the model meets every site twice (``passes``), trained at one site at a time."""
    return _sequential("brats_cyclic", params, planned_rounds("brats_cyclic", params))


def swt(params: JobParams) -> Recipe:
    """Single weight transfer: the model meets every site once."""
    return _sequential("brats_swt", params, planned_rounds("brats_swt", params))


def _hyperseg(name: str, params: JobParams, variant: str, descriptor: str) -> Recipe:
    """Shared weights averaged, each site's personal tensors generated by a server-side hypernetwork.

    The hypernetwork generates learnable tensors only. The running statistics of the batch-norm layers whose scale
    and shift it generates (Conv + BN) are neither generated nor averaged: they stay at their site, as in FedBN
    (personal selection ``stats``), and a resumed job's sites go on from the statistics they kept, with the optimiser
    and sampling state they kept. Since every round brings newly generated scales and shifts, the statistics a site
    kept belong to last round's weights: the site re-estimates them on its training data for each model it receives,
    before it validates, trains or scores it (``recalibrate_stats``; docs/results.md, HyperSeg).
    """
    hn = params.hypernetwork
    model = params.model()
    learnable = dict(model.named_parameters())
    chosen = personal_keys(model, VARIANTS[variant])
    # Conv + BN chooses every normalisation layer, so its statistics are all of the model's (``stats``)
    site_stats = any(k not in learnable for k in chosen)
    controller = HyperSegController(
        personal_keys=[k for k in chosen if k in learnable],
        site_kept=[k for k in chosen if k not in learnable],
        num_rounds=params.rounds,
        descriptor=descriptor,
        embedding_dim=hn.embedding_dim,
        hn_depth=hn.depth,
        hn_width=hn.width,
        hn_optimizer=hn.optimizer,
        hn_lr=hn.lr,
        warmup_rounds=hn.warmup_rounds,
        seed=params.seed,
        round_timeout=params.round_timeout or 0,
        eval_timeout=_eval_timeout(params),
        resume_from=params.resume_from,
        norm_ratio=params.norm_ratio,
        min_good=min(params.min_good, params.sites),
        task_check_period=TASK_CHECK_PERIOD,
        **params.round_lr(),
    )
    # the hypernetwork makes the sites' personal layers; a resumed site goes on from its optimiser, its sampling
    # state and the statistics it keeps (``brats_fl.site.client``)
    client = params.client_config() | {"personal": "stats" if site_stats else "none", "recalibrate_stats": site_stats}
    recipe = ControllerRecipe(name, params, controller, client)
    return _with_evaluation(recipe, params, client, personalise=False)


def hyperseg_conv(params: JobParams) -> Recipe:
    """HyperSeg Conv: the hypernetwork generates each site's last convolution from a one-hot site vector."""
    return _hyperseg("brats_hyperseg_conv", params, "conv", "onehot")


def hyperseg_conv_bn(params: JobParams) -> Recipe:
    """HyperSeg Conv + BN: the last convolution and every (batch-norm) normalisation layer."""
    return _hyperseg("brats_hyperseg_conv_bn", _batch_norm(params), "conv_bn", "onehot")


def hyperseg_conv_bn_emb(params: JobParams) -> Recipe:
    """HyperSeg Conv + BN + embedding: as Conv + BN, from a site embedding learned with the hypernetwork."""
    return _hyperseg("brats_hyperseg_conv_bn_emb", _batch_norm(params), "conv_bn", "embedding")


def _segviz(name: str, params: JobParams, personal: str) -> Recipe:
    """SegViz: representation averaged over all sites, each head over the sites annotating its region, then
    fine-tuning of the task block with the representation frozen (``finetune_epochs``, 0 to skip)."""
    model = params.model(multi_head=True)
    aggregator = TaskHeadAggregator(
        expected_shapes(model.state_dict()), head_keys(model), params.norm_ratio, min(params.min_good, params.sites)
    )
    controller = SegVizFedAvg(
        seed=params.seed,
        num_clients=params.clients_per_round or params.sites,
        num_rounds=params.rounds,
        aggregator=aggregator,
        min_responses=params.min_responses,
        round_wait=params.round_wait,
        round_timeout=params.round_timeout or 0,
        resume=bool(params.resume_from),
        task_check_period=TASK_CHECK_PERIOD,
        **params.round_lr(),
    )
    client = params.client_config() | {"multi_head": True, "personal": personal, "finetune_scope": "heads"}
    client["finetune_epochs"] = _finetune_epochs(params)
    return _with_evaluation(ControllerRecipe(name, params, controller, client, model=model), params, client)


def segviz_fedavg(params: JobParams) -> Recipe:
    """SegViz with FedAvg on the representation block (partial labels, one head per region)."""
    return _segviz("brats_segviz_fedavg", params, personal=params.personal or "none")


def segviz_fedbn(params: JobParams) -> Recipe:
    """SegViz with FedBN: every batch-norm layer, statistics included, stays at its site."""
    return _segviz("brats_segviz_fedbn", _batch_norm(params), personal=params.personal or "norm")


def segviz_local(params: JobParams) -> FedAvgRecipe:
    """SegViz's single-task baseline: every site trains the multi-head model alone on the regions it annotates,
    so each region's model is trained only where that region is labelled; nothing leaves a site."""
    return _fedavg("brats_segviz_local", params, params.sites, personal="all", multi_head=True)


def segviz_central(params: JobParams) -> FedAvgRecipe:
    """SegViz's lower bound: the partially labelled sites pooled, an unannotated region taken as background."""
    return _fedavg("brats_segviz_central", params, 1, datalist="site-All", multi_head=True, partial_labels="background")


def central(params: JobParams) -> FedAvgRecipe:
    """The centralized baseline: one site trains on the pooled datalist ``site-All``."""
    return _fedavg("brats_central", params, 1, datalist="site-All")


def local(params: JobParams) -> FedAvgRecipe:
    """The local-only baseline: every site trains alone; no weight leaves a site, nothing is aggregated."""
    return _fedavg("brats_local", params, params.sites, personal="all")


def fedavg(params: JobParams) -> FedAvgRecipe:
    """Federated averaging weighted by each site's number of training cases."""
    return _fedavg("brats_fedavg", params, params.sites, personal=params.personal or "none")


def fedper(params: JobParams) -> FedAvgRecipe:
    """FedPer: the last layers (the head) stay at each site; the rest is averaged."""
    return _fedavg("brats_fedper", params, params.sites, personal=params.personal or "head:2")


def fedbn(params: JobParams) -> FedAvgRecipe:
    """FedBN (Li et al. 2021): every batch-norm layer stays at its site, scale, shift and running statistics, so
    each scanner keeps its own statistics. With ``norm`` instance or group only the scale and shift stay."""
    return _fedavg("brats_fedbn", _batch_norm(params), params.sites, personal=params.personal or "norm")


def _batch_norm(params: JobParams) -> JobParams:
    """``params`` with batch norm, whose statistics the FedBN, SegViz and HyperSeg papers keep at the sites, unless
    the user chose another ``norm``."""
    return params if params.norm else replace(params, norm="batch")


def _finetune_epochs(params: JobParams) -> int:
    return FINETUNE_EPOCHS if params.finetune_epochs is None else params.finetune_epochs


def fedavg_ft(params: JobParams) -> FedAvgRecipe:
    """FedAvg, then each site fine-tunes the whole final global model on its own data."""
    finetune = (_finetune_epochs(params), "all")
    return _fedavg("brats_fedavg_ft", params, params.sites, personal=params.personal or "none", finetune=finetune)


def fedbn_ft(params: JobParams) -> FedAvgRecipe:
    """FedBN, then each site fine-tunes its personal (normalisation) layers with the shared ones frozen."""
    finetune = (_finetune_epochs(params), "personal")
    params = _batch_norm(params)
    return _fedavg("brats_fedbn_ft", params, params.sites, personal=params.personal or "norm", finetune=finetune)


def _fedopt(name: str, params: JobParams, rule: str) -> FedAvgRecipe:
    """FedOpt (Reddi et al. 2021): FedAvg's rounds, screening and evaluation, the averaged update taken as a
    pseudo-gradient for a server step of ``rule`` on the model's parameters; running statistics averaged."""
    model = params.model()
    server = {
        "server_optimizer": rule,
        "parameter_keys": [k for k, _ in model.named_parameters()],
        "server_lr": params.server_lr,
        "beta1": params.beta1,
        "tau": params.tau,
        # a resumed job's server optimiser goes on from the moments saved beside its last global model
        "resume_from": params.resume_from,
    }
    if rule != "adagrad":
        server["beta2"] = params.beta2
    return _fedavg(name, params, params.sites, controller=(FedOptController, server))


def fedadam(params: JobParams) -> FedAvgRecipe:
    """FedAdam: an Adam step (without bias correction, as Reddi et al.) on the averaged update."""
    return _fedopt("brats_fedadam", params, "adam")


def fedyogi(params: JobParams) -> FedAvgRecipe:
    """FedYogi: Yogi's step, whose second moment grows or shrinks by at most (1 - beta2) times the update's square."""
    return _fedopt("brats_fedyogi", params, "yogi")


def fedadagrad(params: JobParams) -> FedAvgRecipe:
    """FedAdagrad: an Adagrad step (with momentum beta1, as Reddi et al.) on the averaged update."""
    return _fedopt("brats_fedadagrad", params, "adagrad")


def fedprox(params: JobParams) -> FedAvgRecipe:
    """FedProx: FedAvg whose sites add mu/2 ||w - w_global||^2 to their loss (``brats_fl.site.algorithms``)."""
    personal = params.personal or "none"
    return _fedavg(
        "brats_fedprox", params, params.sites, personal, recipe_class=DeadlineFedProxRecipe, fedprox_mu=params.mu
    )


def scaffold(params: JobParams) -> Recipe:
    """SCAFFOLD: FLARE's ``Scaffold`` controller averages the models and the sites' control variates; each site
    corrects its steps by them (``brats_fl.site.algorithms``). FLARE's controller aggregates by itself, so the FedAvg
    jobs' screening of updates and deadlines do not apply. A resumed job's server goes on from the control variate
    saved beside its last global model (``brats_fl.server.scaffold``), each site from its own."""
    controller = ResumableScaffold(
        num_clients=params.sites,
        num_rounds=params.rounds,
        persistor_id="persistor",
        resume_from=params.resume_from,
        task_check_period=TASK_CHECK_PERIOD,
    )
    client = params.client_config()
    return _with_evaluation(ControllerRecipe("brats_scaffold", params, controller, client), params, client)


def ditto(params: JobParams) -> FedAvgRecipe:
    """Ditto: FedAvg of the global model, and at each site a personal model pulled towards it, which is what the site
    scores on its own test split after training (``brats_fl.site.algorithms``)."""
    site = {"ditto_lambda": params.ditto_lambda, "personal_epochs": params.personal_epochs}
    return _fedavg("brats_ditto", params, params.sites, site=site)


def planned_rounds(name: str, params: JobParams) -> int:
    """The rounds a job runs: a sequential job's passes around the sites, any other's ``rounds``."""
    passes = get_job(name).passes
    return (params.passes or passes) if passes is not None else params.rounds


def builder(name: str) -> Callable[[JobParams], Recipe]:
    """The function of this module that builds job ``name``'s recipe (``brats_fl.jobs.registry.Job.recipe``)."""
    return globals()[get_job(name).recipe]


def refuse_unused(name: str, values: dict[str, Any]) -> None:
    """Refuse, before anything runs, an option the user set (``brats_fl.settings.params.add_run_options``) that job
    ``name`` would silently ignore."""
    extra = unused(get_job(name).uses, values)
    if extra:
        raise ValueError(f"{name} does not use {', '.join(extra)}; leave {'them' if len(extra) > 1 else 'it'} out")


def build(name: str, params: JobParams | None = None) -> Recipe:
    params = params or JobParams()
    if params.dp_epsilon is not None and "dpsgd" not in get_job(name).uses:
        raise ValueError(f"{name} does not train with DP-SGD ({KINDS['dpsgd']}); leave dp_epsilon out")
    recipe = builder(name)(params)
    recipe.add_client_config(dict(STARTUP_WAITS))
    return recipe
