"""Every training and job parameter, declared once: name, type, default, rule, help, and which kind of job uses it.

From this one declaration come ``JobParams`` and ``HyperNetParams`` (``brats_fl.jobs.catalogue``), their range
checks, the ``brats-fl run`` options and their help, the structured configuration a job gives its sites
(``JobParams.client_config``) and the site's known keys and defaults (``brats_fl.site.client.site_args``). Which
jobs take which kind of parameter is declared next to the jobs (``brats_fl.jobs.registry.Job.uses``). Imports
neither torch nor FLARE, so that the command line answers at once; names that come from FLARE or torch classes
are plain strings here, and a test keeps them equal.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: kinds of parameter only some jobs use (``Param.uses``), in words for the help; every other parameter is for every
#: job. Which jobs are of which kind: ``brats_fl.jobs.registry.Job.uses``
KINDS = {
    "personal": "jobs that let you choose what stays at a site",
    "finetune": "jobs that fine-tune after federated training",
    "sequential": "sequential jobs (cyclic, swt)",
    "hypernetwork": "hyperseg jobs",
    "sampling": "SegViz FedAvg and FedBN",
    "deadline": "jobs whose server may close a round early",
    "timeout": "jobs whose rounds a time limit may end (those whose server may close a round early, and HyperSeg)",
    "screened": "jobs whose server screens the sites' updates (all but brats_scaffold)",
    "fedopt": "FedAdam, FedYogi and FedAdagrad",
    "fedopt_beta2": "FedAdam and FedYogi",
    "fedprox": "brats_fedprox",
    "ditto": "brats_ditto",
    "dpsgd": "jobs whose sites may train with DP-SGD (central, local, FedAvg, FedPer, FedBN, their _ft, FedOpt)",
}
#: the networks a job may train (``brats_fl.seg.model.NETWORKS``; docs/explanation/networks.md)
NETWORK_NAMES = ("unet", "segresnet", "dynunet")
#: the networks' normalisation layers (``brats_fl.seg.model.NORMS``); FedBN's jobs take batch norm, whose running
#: statistics their papers keep at the site, every other job the network's own (U-Net and DynUNet instance norm,
#: SegResNet group norm; ``brats_fl.seg.model``)
NORM_NAMES = ("batch", "instance", "group")
#: what a site does with its optimiser's state at the start of a round (``brats_fl.site.client.Site``)
OPTIMIZER_STATES = ("keep", "reset")
#: mixed-precision settings (``brats_fl.seg.trainer.amp_dtype``)
AMP_MODES = ("auto", "on", "off")
#: training recipes (``brats_fl.seg.trainer.RECIPES``)
RECIPE_NAMES = ("adam_dice", "nnunet", "brats18")
#: whole-job settings by name, under what a user sets (``brats-fl run --preset``; docs/explanation/networks.md).
#: brats18: NVFlare's BraTS18 example (4 sites, 600 rounds of 1 local epoch, SegResNet, 224 x 224 x 144 crops,
#: batch 1, its recipe), for a GPU and BraTS data at 1 mm
PRESETS = {
    "brats18": {
        "network": "segresnet",
        "recipe": "brats18",
        "patch_size": (224, 224, 144),
        "batch_size": 1,
        "local_epochs": 1,
        "rounds": 600,
        "sites": 4,
    },
}
#: FLARE's privacy filters a job may use (``brats_fl.transfer.filters.PRIVACY``)
PRIVACY_NAMES = ("exclude", "percentile", "svt")
#: FLARE's quantisation types a job may use (``brats_fl.transfer.filters.QUANTIZATION``)
QUANTIZATION_NAMES = ("float16", "blockwise8", "float4", "normfloat4")
#: the hypernetwork's optimisers (``brats_fl.server.hyperseg.OPTIMISERS``)
OPTIMISER_NAMES = ("adam", "sgd")
#: a sequential job's visiting orders (``brats_fl.server.sequential.ORDERS``)
ORDER_NAMES = ("fixed", "shuffle")
#: what cross-site evaluation scores (``brats_fl.jobs.catalogue._with_evaluation``)
CROSS_SITE = ("auto", "all", "global", "none")
#: the split a site scores after training (``brats_fl.site.client.Site.final``): validation while tuning
FINAL_SPLITS = ("test", "validation")
#: the tumour regions (``brats_fl.data.labels.REGIONS``), which post-processing takes a volume for
REGION_NAMES = ("TC", "WT", "ET")
#: lesion-wise rules (``brats_fl.seg.lesions.RULES``); auto: each case's release's
LESION_RULE_NAMES = ("auto", "2023", "2024", "2025")
#: FLARE's default of 10 s for a task to be picked up suits toy models, not 3D training on a CPU
TASK_TIMEOUT = 6 * 3600


def key_value(text: str) -> tuple[str, Any]:
    """``epsilon=0.1`` -> ("epsilon", 0.1); a value that is not JSON stays a string (``exclude_vars=^net``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, e.g. fraction=0.1, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@dataclass(frozen=True)
class Param:
    """One parameter. ``rule`` says in words what ``check`` accepts (None always passes the check unless
    ``optional`` is False); ``flag`` is its ``brats-fl run`` option (None: Python only); ``site`` its key in the
    sites' configuration (None: the server's alone); ``uses`` the kind of job that uses it (``KINDS``)."""

    name: str
    type: Any
    default: Any
    help: str
    rule: str = ""
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()
    flag: str | None = None
    nargs: int | str | None = None
    metavar: str | None = None
    #: argparse's type of one value on the command line, where it is not ``type``
    item: Callable[[str], Any] | None = None
    site: str | None = None
    uses: str | None = None
    hypernetwork: bool = False
    #: the command line's value -> the parameter's (tuples for lists, an absolute path, a dict of KEY=VALUE pairs)
    from_cli: Callable[[Any], Any] | None = None
    #: the parameter's value -> what the sites are sent
    to_site: Callable[[Any], Any] = lambda v: v
    #: what an unset (None) default means, for the help
    unset: str = "the job's own"

    def validate(self, value: Any) -> None:
        """Refuse a value out of range, naming the parameter, before anything is built or sent to a site."""
        if value is None and self.default is None:
            return
        ok = value in self.choices if self.choices else self.check is None or self.check(value)
        if not ok:
            rule = self.rule or f"{self.name} one of {list(self.choices)}"
            raise ValueError(f"job parameter out of range: need {rule}, got {value!r}")

    def add_to(self, parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
        """This parameter as a command-line option; by default an unset option is absent from the namespace, so
        that only what the user set counts."""
        shown = self.default if default is argparse.SUPPRESS else default
        extra = f" ({KINDS[self.uses]} only)" if self.uses else ""
        text = f"{self.help}{extra}; default {self.unset if shown is None else _shown(shown)}"
        if self.type is bool:
            parser.add_argument(self.flag, action="store_true", default=default, help=text)
            return
        parser.add_argument(
            self.flag,
            type=self.item or self.type,
            default=default,
            nargs=self.nargs,
            choices=self.choices or None,
            metavar=self.metavar,
            help=text,
        )


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_min_volume(value: Any) -> str | dict[str, float]:
    """The post-processing setting (``min_volume``): ``none``, ``auto``, one volume for every region (``50``) or
    ``REGION=MM3`` pairs (``WT=100,ET=25``, the other regions 0) -> ``none``, ``auto`` or ``{region: mm³}``
    (``brats_fl.seg.postprocess``); refuses anything else, naming the parameter."""
    text = str(value).strip()
    if text in ("none", "auto"):
        return text
    try:
        if "=" in text:
            pairs = [part.split("=", 1) for part in text.split(",")]
            volumes = dict.fromkeys(REGION_NAMES, 0.0) | {k.strip(): float(v) for k, v in pairs}
        else:
            volumes = dict.fromkeys(REGION_NAMES, float(text))
    except ValueError:
        volumes = {}
    if not volumes or set(volumes) - set(REGION_NAMES) or not all(v >= 0 for v in volumes.values()):
        raise ValueError(
            f"min_volume: need none, auto, a volume >= 0 (mm³) or REGION=MM3 pairs of {', '.join(REGION_NAMES)} "
            f"(e.g. WT=100,ET=25), got {value!r}"
        )
    return volumes


def _min_volume_setting(value: Any) -> bool:
    try:
        parse_min_volume(value)
    except ValueError:
        return False
    return True


def _at_least_one(name: str, help_text: str, **kw: Any) -> Param:
    return Param(name, int, kw.pop("default", None), help_text, rule=f"{name} >= 1", check=_positive, **kw)


def _seconds(name: str, default: int | None, help_text: str, **kw: Any) -> Param:
    rule = f"{name} > 0 (seconds)"
    return Param(
        name, int, default, help_text, rule=rule, check=lambda v: v > 0, flag=f"--{name.replace('_', '-')}", **kw
    )


#: every parameter of a job, in the order of ``JobParams``
PARAMS: tuple[Param, ...] = (
    _at_least_one("rounds", "federated rounds", default=20, flag="--rounds", site="rounds"),
    _at_least_one("local_epochs", "local epochs per round", default=4, flag="--local-epochs", site="local_epochs"),
    _at_least_one("sites", "number of sites", default=3, flag="--sites"),
    Param("patch_size", tuple, (64, 64, 64), "training patch size (voxels)", flag="--patch", nargs=3, item=int,
          site="patch", from_cli=tuple, to_site=list),
    Param("network", str, "unet", "the network: MONAI's UNet (small, for CPUs), SegResNet (NVFlare's BraTS18 example) "
          "or DynUNet (nnU-Net's 3D full-resolution shape, deep supervision); docs/explanation/networks.md",
          choices=NETWORK_NAMES, flag="--network", site="network"),
    Param("channels", tuple, None, "channels per level (SegResNet: doubling from its initial filters)",
          flag="--channels", nargs="+", item=int, site="channels", from_cli=tuple,
          to_site=lambda v: list(v) if v else None,
          unset="the network's: unet and segresnet 16 32 64 128, dynunet 32 64 128 256 320 320"),
    Param("norm", str, None, "normalisation: batch, instance or group (of 8 channel groups)",
          rule=f"norm one of {list(NORM_NAMES)}", choices=NORM_NAMES, flag="--norm", site="norm",
          unset="the network's: instance (unet, dynunet), group (segresnet)"),
    Param("recipe", str, "adam_dice", "training recipe: adam_dice (Adam, Dice loss, constant rate 3e-3), nnunet "
          "(SGD with Nesterov momentum, Dice + cross-entropy, weight decay 3e-5, rate 1e-2 decayed by the server per "
          "round, poly 0.9) or brats18 (NVFlare's BraTS18 example: Adam 1e-4, weight decay 1e-5, Dice of squared "
          "predictions, one patch per case)", choices=RECIPE_NAMES, flag="--recipe", site="recipe"),
    Param("lr", float, None, "initial learning rate", rule="0 < lr < 1", check=lambda v: 0 < v < 1, flag="--lr",
          site="lr", unset="the recipe's (adam_dice 3e-3, nnunet 1e-2, brats18 1e-4)"),
    Param("momentum", float, None, "Nesterov momentum of an SGD recipe: 0.9 as the federated nnU-Net slides, 0.99 as "
          "nnU-Net, 0 for plain SGD (as SCAFFOLD is derived)", rule="0 <= momentum < 1, with an SGD recipe",
          check=lambda v: 0 <= v < 1, flag="--momentum",
          site="momentum", unset="the recipe's (nnunet 0.9)"),
    # FedAvg's paper restarts plain SGD at each round; a stateful optimiser's moments may help or mislead a site
    # whose model was just replaced by the average (docs/results.md measures both)
    Param("optimizer_state", str, "keep", "the sites' optimiser state between rounds (Adam's moments and step count, "
          "SGD's momentum): keep carries it from round to round; reset starts every round afresh from the received "
          "model (Ditto's personal model keeps its own)", choices=OPTIMIZER_STATES, flag="--optimizer-state",
          site="optimizer_state"),
    # real BraTS pipelines train at lower resolution: at 2 mm a 64^3 patch covers 128 mm, most of a brain
    Param("spacing", float, None, "voxel size (mm, isotropic) that training and inference resample the brain to; "
          "predictions are resampled back and scored on each case's own grid", rule="0 < spacing <= 10 (mm)",
          check=lambda v: _number(v) and 0 < v <= 10, flag="--spacing", site="spacing",
          unset="none: the files' own grid"),
    # issue 39, item 5: generalises the ET-only threshold of issue 20 to every region's components; auto by default
    # since measured to help on a trained model (docs/explanation/metrics.md)
    Param("min_volume", str, "auto", "post-processing of each site's final test scores: predicted components "
          "smaller than a volume per region are removed (brats_fl.seg.postprocess): auto chooses each region's on the "
          "site's validation split, pooled over the sites where a split has too few cases; none keeps every "
          "component; a volume (mm³) for every region, or REGION=MM3 pairs (WT=100,ET=25)",
          rule="min_volume none, auto, a volume >= 0 (mm³) or REGION=MM3 pairs", check=_min_volume_setting,
          flag="--min-volume", site="min_volume"),
    Param("lesion_rule", str, "auto", "the BraTS lesion-wise rule test cases are scored by: 2023, 2024 or 2025 "
          "(brats_fl.seg.lesions, docs/explanation/metrics.md); auto: each case's release's (2024 post-treatment data "
          "2024, every other 2023)", choices=LESION_RULE_NAMES, flag="--lesion-rule", site="lesion_rule"),
    Param("amp", str, "auto", "mixed precision: auto is on with a GPU (bfloat16; float16 with loss scaling before "
          "Ampere) and off on a CPU; on uses bfloat16 on a CPU", choices=AMP_MODES, flag="--amp", site="amp"),
    _at_least_one("batch_size", "patches per batch", default=2, flag="--batch", site="batch"),
    # nnU-Net oversamples foreground to one third; 0 would train on background alone
    Param("fg_ratio", float, 0.33, "share of training patches centred on tumour", rule="0 < fg_ratio <= 1",
          check=lambda v: 0 < v <= 1, flag="--fg-ratio", site="fg_ratio"),
    Param("seed", int, 0, "seed of the model's initialisation, sampling and augmentation", rule="seed >= 0",
          check=lambda v: v >= 0, flag="--seed", site="seed"),
    Param("personal", str, None, "keys kept at each site: none, all, head:N, norm, stats, head:N+norm",
          flag="--personal", uses="personal"),
    Param("finetune_epochs", int, None, "local epochs after federated training", rule="finetune_epochs >= 0",
          check=lambda v: v >= 0, flag="--finetune-epochs", uses="finetune"),
    Param("finetune_lr", float, None, "constant learning rate of fine-tuning", rule="0 < finetune_lr < 1",
          check=lambda v: 0 < v < 1, flag="--finetune-lr", site="finetune_lr", uses="finetune",
          unset="a tenth of the initial learning rate (brats_fl.seg.trainer.FINETUNE_SHARE)"),
    Param("resume_from", str, None, "continue from a run's FL_global_model.pt", flag="--resume-from", item=Path,
          from_cli=lambda p: str(Path(p).resolve()), site="resume", to_site=bool),
    Param("cross_site", str, "auto", "cross-site evaluation: every site scores the server's models and every site's "
          "submitted model (all), the server's models only (global), or nothing beyond each site's own final model "
          "(none); auto: global where a site ends with another model than the federation's (fine-tuning, Ditto), "
          "whose table then has its row before fine-tuning, else none", rule=f"cross_site one of {list(CROSS_SITE)}",
          choices=CROSS_SITE, flag="--cross-site"),
    # brats-fl tune (brats_fl.results.tune) selects on validation and must never open the test split
    Param("final_split", str, "test", "the split every site scores after training (its own final model, cross-site "
          "evaluation): test, or validation while tuning, when a site neither checks nor reads its test files",
          choices=FINAL_SPLITS, flag="--final-split", site="final_split"),
    # no fixed wait of hours: a hung site holds the evaluation as long as the user lets it hold a round
    _seconds("eval_timeout", None, "seconds the evaluation after training (each site's own test split, "
             "cross-site evaluation) waits for a site's scores; a site that has not answered by then is named and "
             "left out", unset="--round-timeout where the job has one, else none: as long as it takes"),
    Param("transfer", str, "full", "what a site sends: its full weights or the diff to the received ones",
          rule="transfer full or diff", choices=("full", "diff"), flag="--transfer"),
    _at_least_one("passes", "trips around the sites", flag="--passes", uses="sequential"),
    _at_least_one("visit_epochs", "local epochs per visit (default rounds * local epochs / passes)",
                  flag="--visit-epochs", uses="sequential"),
    Param("order", str, "fixed", "visiting order", rule=f"order one of {ORDER_NAMES}", choices=ORDER_NAMES,
          flag="--order", uses="sequential"),
    _seconds("assignment_timeout", 1800, "seconds until a visit not picked up is skipped", uses="sequential"),
    _seconds("visit_timeout", TASK_TIMEOUT, "seconds until an unfinished visit is skipped", uses="sequential"),
    _at_least_one("clients_per_round", "sites sampled per round (default all)", flag="--clients-per-round",
                  uses="sampling"),
    Param("norm_ratio", float, 10.0, "refuse an update whose norm is this many times the round's median",
          rule="norm_ratio > 1", check=lambda v: v > 1, flag="--norm-ratio", uses="screened"),
    Param("min_good", int, 1, "stop the job if a round has fewer good updates", rule="min_good >= 1",
          check=_positive, flag="--min-good", uses="screened"),
    Param("privacy", str, "none", "FLARE privacy filter on the training updates (docs/howto/privacy.md)",
          rule=f"privacy none or one of {list(PRIVACY_NAMES)}", choices=("none", *PRIVACY_NAMES), flag="--privacy"),
    Param("privacy_args", dict, {}, "arguments of the privacy filter, e.g. fraction=0.1 epsilon=0.1",
          flag="--privacy-arg", nargs="+", metavar="KEY=VALUE", item=key_value,
          from_cli=dict),
    # DP-SGD at the sites (brats_fl.seg.dp): delta 1e-5 is below 1/n for any hospital's number of cases; a clip of 1
    # is Opacus's examples' and the DP-SGD literature's usual start (Abadi et al. tune it over 1-10)
    Param("dp_epsilon", float, None, "DP-SGD at every site: the epsilon each training case is protected with over the "
          "whole job, at dp_delta (noise calibrated by Opacus's RDP accountant; docs/howto/privacy.md)",
          rule="0 < dp_epsilon <= 1000", check=lambda v: _number(v) and 0 < v <= 1000, flag="--dp-epsilon",
          site="dp_epsilon", uses="dpsgd", unset="none: no DP-SGD"),
    Param("dp_delta", float, 1e-5, "DP-SGD: the delta of the guarantee", rule="0 < dp_delta < 0.01",
          check=lambda v: _number(v) and 0 < v < 0.01, flag="--dp-delta", site="dp_delta", uses="dpsgd"),
    Param("dp_clip", float, 1.0, "DP-SGD: each training case's gradient is clipped to this L2 norm",
          rule="dp_clip > 0", check=lambda v: _number(v) and v > 0, flag="--dp-clip", site="dp_clip", uses="dpsgd"),
    Param("privacy_budget", float, None, "refuse to start, or stop, a job whose epsilon per site would exceed this "
          "(a job without a differentially private mechanism has no finite epsilon)",
          rule="privacy_budget > 0", check=lambda v: _number(v) and v > 0, flag="--privacy-budget",
          unset="none: no budget"),
    Param("quantize", str, "none", "FLARE quantisation of the models on the wire",
          rule=f"quantize none or one of {list(QUANTIZATION_NAMES)}", choices=("none", *QUANTIZATION_NAMES),
          flag="--quantize"),
    Param("audit_transfer", bool, False, "each site records what it sends and receives", flag="--audit-transfer"),
    Param("faults", dict, {}, "drill: {site: [fault of round 0, of round 1, ...]} (brats_fl.drills.faults)"),
    _at_least_one("min_responses", "sites that must answer a round (default all)", flag="--min-responses",
                  uses="deadline"),
    Param("round_wait", int, 0, "with --min-responses: seconds to wait for the other sites once that many answered",
          rule="round_wait >= 0 seconds", check=lambda v: v >= 0, flag="--round-wait", uses="deadline"),
    # FLARE's FedAvg waits for ever on a site that stays connected but stops answering (a hung process): its
    # heartbeat keeps the site alive, so nothing else ends the round (docs/howto/deploy.md, "A hung site")
    Param("round_timeout", int, None, "seconds a round waits at most for the sites' answers; a round that ends short "
          "of --min-responses (without it: of any site) stops the job, naming the sites that did not answer",
          rule="round_timeout >= 1 seconds", check=_positive, flag="--round-timeout", uses="timeout",
          unset="none: as long as it takes"),
    Param("delays", dict, {}, "drill: {site: seconds each training update is held}", rule="delays >= 0 seconds",
          check=lambda d: min(d.values(), default=0) >= 0),
    Param("audit", bool, False, "every site keeps a copy of each model it receives and sends", site="audit"),
    # Reddi et al. 2021 fix beta1 0.9 and beta2 0.99 throughout and tune the server lr and tau per task over powers of
    # ten; 1e-2 and 1e-3 are values from those grids (brats_fl.server.fedopt)
    Param("server_lr", float, 1e-2, "server learning rate eta of FedOpt (Reddi et al. tune it per task)",
          rule="server_lr > 0", check=lambda v: _number(v) and v > 0, flag="--server-lr", uses="fedopt"),
    Param("beta1", float, 0.9, "server momentum decay beta1 of FedOpt (Reddi et al.: 0.9)", rule="0 <= beta1 < 1",
          check=lambda v: _number(v) and 0 <= v < 1, flag="--beta1", uses="fedopt"),
    Param("beta2", float, 0.99, "server second-moment decay beta2 (Reddi et al.: 0.99)", rule="0 <= beta2 < 1",
          check=lambda v: _number(v) and 0 <= v < 1, flag="--beta2", uses="fedopt_beta2"),
    Param("tau", float, 1e-3, "adaptivity tau of FedOpt: added to sqrt(v), which starts at tau^2", rule="tau > 0",
          check=lambda v: _number(v) and v > 0, flag="--tau", uses="fedopt"),
    # FLARE's FedProxRecipe default. The FedProx paper (Li et al., MLSys 2020) fixes no default: it picks mu per data
    # set from {0.001, 0.01, 0.1, 1}. mu = 0 is FedAvg, which FLARE's recipe refuses to run as FedProx
    Param("mu", float, 0.01, "FedProx: weight of the proximal term mu/2 ||w - w_global||^2", rule="mu > 0",
          check=lambda v: isinstance(v, int | float) and 0 < v < float("inf"), flag="--mu", uses="fedprox"),
    # FLARE's PTDittoHelper defaults: lambda 0.1, one epoch of the personal model per round
    Param("ditto_lambda", float, 0.1, "Ditto: weight of the pull lambda/2 ||v - w_global||^2 on the personal model",
          rule="ditto_lambda >= 0", check=lambda v: isinstance(v, int | float) and 0 <= v < float("inf"),
          flag="--ditto-lambda", uses="ditto"),
    _at_least_one("personal_epochs", "Ditto: epochs of the personal model per round", default=1,
                  flag="--personal-epochs", uses="ditto"),
)  # fmt: skip

#: the hypernetwork of the HyperSeg jobs (``HyperNetParams``): the paper's 20 layers of 100 units, embedding of 10
#: and Adam, but at lr 1e-3, not the paper's 0.03, under which our sites stopped learning (docs/history.md)
HYPERNETWORK: tuple[Param, ...] = (
    _at_least_one("depth", "linear layers of the hypernetwork", default=20, flag="--hn-depth", uses="hypernetwork"),
    _at_least_one("width", "units per hidden layer", default=100, flag="--hn-width", uses="hypernetwork"),
    _at_least_one("embedding_dim", "size of the site embedding", default=10, flag="--embedding-dim",
                  uses="hypernetwork"),
    Param("optimizer", str, "adam", "the hypernetwork's optimiser", choices=OPTIMISER_NAMES, flag="--hn-optimizer",
          uses="hypernetwork"),
    Param("lr", float, 1e-3, "the hypernetwork's learning rate", rule="hypernetwork lr > 0", check=lambda v: v > 0,
          flag="--hn-lr", uses="hypernetwork"),
    Param("warmup_rounds", int, 0, "rounds of plain FedAvg before the hypernetwork starts", rule="warmup_rounds >= 0",
          check=lambda v: v >= 0, flag="--warmup-rounds", uses="hypernetwork"),
)  # fmt: skip

#: site keys a job sets from its own choices (personalisation, fine-tuning, pooling, heads), with the site's default
#: and meaning: (default, help)
SITE_ONLY: dict[str, tuple[Any, str]] = {
    "job": ("brats_fl", "job name: where the site keeps its personal layers"),
    "datalist": (None, "datalist name instead of the site's own (e.g. site-All)"),
    "personal": ("none", "keys that never leave the site: none, all, head:N, norm, stats"),
    "finetune_epochs": (0, "local epochs after federated training"),
    "finetune_scope": ("all", "what fine-tuning trains: personal, heads or all"),
    "multi_head": (False, "one head per region on a shared U-Net (SegViz)"),
    "partial_labels": (None, "unannotated regions in the loss: ignore or background"),
    "threads": (None, "torch threads; default the site configuration's"),
    "ditto_lambda": (None, "Ditto's lambda; None: no personal model (brats_fl.site.algorithms)"),
    "personal_epochs": (1, "Ditto: epochs of the personal model per round"),
    "recalibrate_stats": (False, "re-estimate batch-norm statistics on the training data for each received model"),
}


def by_name(name: str) -> Param:
    """The job parameter ``name`` (``JobParams``)."""
    return next(p for p in PARAMS if p.name == name)


def site_defaults() -> dict[str, Any]:
    """Every key a site knows, with the value it takes when a job does not send it."""
    sent = {p.site: p.to_site(p.default) for p in PARAMS if p.site}
    return sent | {k: default for k, (default, _) in SITE_ONLY.items()}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every job and hypernetwork parameter with a flag as an option of ``brats-fl run``; unset ones stay absent."""
    for p in (*PARAMS, *HYPERNETWORK):
        if p.flag:
            p.add_to(parser)


def dest(p: Param) -> str:
    """The namespace key of ``p``'s option."""
    return p.flag.removeprefix("--").replace("-", "_") if p.flag else ""


def from_cli(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options a user set (``add_run_options``) -> keyword arguments of ``JobParams`` and of ``HyperNetParams``."""
    job: dict[str, Any] = {}
    hn: dict[str, Any] = {}
    for group, out in ((PARAMS, job), (HYPERNETWORK, hn)):
        for p in group:
            if p.flag and dest(p) in values:
                value = values[dest(p)]
                out[p.name] = p.from_cli(value) if p.from_cli else value
    return job, hn


def unused(uses: frozenset[str], values: dict[str, Any]) -> list[str]:
    """The options a user set (``add_run_options``) that only a kind of job other than ``uses`` takes."""
    return [p.flag for p in (*PARAMS, *HYPERNETWORK) if p.flag and dest(p) in values and p.uses and p.uses not in uses]
