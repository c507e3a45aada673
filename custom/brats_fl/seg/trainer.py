"""Train, validate and infer a segmentation network. Knows nothing of FLARE.

The central baseline, the FLARE client script and the benchmarks all call this one loop.
Two recipes: Dice loss with Adam (the BraTS FedPer report) and the nnU-Net recipe of the federated nnU-Net slides
(Dice + cross-entropy, SGD with Nesterov momentum, weight decay 3e-5, initial rate 1e-2 with polynomial decay,
exponent 0.9). A recipe's learning rate holds unless the user sets one, and its momentum likewise.

Where the rate decays: in a federated job the server decides each round's rate (``poly_lr`` over rounds,
``brats_fl.server.schedule``) and the site trains every local epoch of that round at it (``train_epochs(lr=...)``);
the slides decay the rate on the server by round. Without a server that schedules (the central and local-only
jobs, ``brats-fl train-central``) the trainer decays it itself per epoch over ``total_epochs``, as nnU-Net does.
Fine-tuning after federated training runs at a constant rate of its own (``finetune_lr``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceLoss
from monai.transforms import Orientation, ResampleToMatch, Spacing
from monai.utils import set_determinism
from torch.nn.modules.loss import _Loss
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from brats_fl.data.loading import ANNOTATED, AXIS_LABELS, BRATS_ORIENTATION, train_loader
from brats_fl.seg.dp import DPSGD, check_dp_model
from brats_fl.seg.metrics import RegionMetrics
from brats_fl.seg.model import NETWORKS, BratsNet, build_model, model_args
from brats_fl.seg.postprocess import Choice, remove_small_components
from brats_fl.settings.params import by_name

RECIPES = {
    # lr 3e-3, not the FedPer report's 1e-3: on the phantom, 1e-3 reached mean Dice 0.13 after 10 epochs
    # where 3e-3 reached 0.74 (docs/history.md, "Training defaults")
    "adam_dice": {
        "optimizer": "adam",
        "loss": "dice",
        "lr": 3e-3,
        "momentum": None,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
    },
    # the slides' federated nnU-Net: SGD, momentum 0.9 (nnU-Net itself uses 0.99, a --momentum away), lr 1e-2,
    # weight decay 3e-5, Dice + cross-entropy, poly decay with exponent 0.9
    "nnunet": {
        "optimizer": "sgd",
        "loss": "dice_ce",
        "lr": 1e-2,
        "momentum": 0.9,
        "weight_decay": 3e-5,
        "lr_schedule": "poly",
    },
    # NVFlare's BraTS18 example (SegResNet; brats_fl.settings.params.PRESETS["brats18"] sets the rest of its job): Adam
    # at 1e-4 with weight decay 1e-5, MONAI's Dice loss on squared predictions, one crop per case per step
    "brats18": {
        "optimizer": "adam",
        "loss": "dice_squared",
        "lr": 1e-4,
        "momentum": None,
        "weight_decay": 1e-5,
        "lr_schedule": "constant",
        "samples_per_case": 1,
    },
}
#: the losses (``RegionLoss``): Dice, Dice + cross-entropy, Dice of squared predictions in the denominator
LOSSES = ("dice", "dice_ce", "dice_squared")
#: the exponent of the polynomial decay (nnU-Net's and the slides')
POLY_EXPONENT = 0.9
#: fine-tuning's learning rate, unless set, as a share of the job's initial rate. Fine-tuning adapts a trained model
#: to a site's few cases: the full initial rate would undo much of what federation learned, and the decayed last
#: rate (which the poly schedule takes towards 0) would change nothing; a tenth is the usual step down for it.
FINETUNE_SHARE = 0.1


def poly_lr(lr0: float, step: int, steps: int, exponent: float = POLY_EXPONENT) -> float:
    """nnU-Net's polynomial decay: ``lr0 * (1 - step / steps) ** exponent`` for step 0 .. steps - 1.

    Step 0 trains at ``lr0``, the last step at ``lr0 * (1 / steps) ** exponent``, never at 0. A step is an epoch
    where the trainer schedules itself and a server round (counted from 0, FLARE's ``current_round``) where a
    server does (``brats_fl.server.schedule``). A step outside the schedule is refused, not trained at lr 0."""
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"a poly schedule of {steps} step(s) has no step {step}")
    return lr0 * (1 - step / steps) ** exponent


@dataclass
class TrainConfig:
    """Everything that decides how a network is trained and evaluated; stored with every run."""

    model: dict = field(default_factory=dict)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    #: voxel size (mm) training and inference resample the brain to; None: the files' own (``brats_fl.settings.params``)
    spacing: float | None = None
    #: mixed precision: auto (on with a GPU), on, off (``amp_dtype``)
    amp: str = "auto"
    batch_size: int = 2
    samples_per_case: int = 2
    #: share of training patches centred on tumour (``brats_fl.settings.params``)
    fg_ratio: float = by_name("fg_ratio").default
    optimizer: str = "adam"
    loss: str = "dice"
    #: the initial learning rate
    lr: float = 3e-3
    #: SGD's Nesterov momentum (None for Adam, which has none to set)
    momentum: float | None = None
    weight_decay: float = 0.0
    #: ``poly`` decays ``lr`` per epoch over ``total_epochs`` when no server gives a round's rate (``train_epochs``)
    lr_schedule: str = "constant"
    total_epochs: int = 100
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    threads: int | None = None
    seed: int = 0
    #: a region a case's site did not annotate: ``ignore`` it in the loss (SegViz), or take it as
    #: ``background`` (naive pooling of partial labels, the SegViz paper's lower bound)
    partial_labels: str = "ignore"
    #: DP-SGD (``brats_fl.seg.dp``): the (epsilon, delta) every training case is protected with over ``dp_epochs``
    #: epochs (None: ``total_epochs``), each case's gradient clipped to ``dp_clip``; None: no DP-SGD
    dp_epsilon: float | None = None
    dp_delta: float = by_name("dp_delta").default
    dp_clip: float = by_name("dp_clip").default
    dp_epochs: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (a job's arguments), refusing unknown keys and applying a named recipe first: the
        recipe's settings hold unless ``values`` sets them (an ``lr`` or ``momentum`` of None is the recipe's)."""
        values = dict(values)
        recipe = values.pop("recipe", None)
        if recipe is not None:
            if recipe not in RECIPES:
                raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
            given = {k: v for k, v in values.items() if not (k in ("lr", "momentum") and v is None)}
            if given.get("momentum") is not None and RECIPES[recipe]["optimizer"] != "sgd":
                raise ValueError(f"momentum is SGD's; recipe {recipe} trains with {RECIPES[recipe]['optimizer']}")
            values = {**RECIPES[recipe], **given}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.optimizer in ("adam", "sgd"), f"optimizer must be adam or sgd, got {self.optimizer!r}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (
                self.lr_schedule in ("constant", "poly"),
                f"lr_schedule must be constant or poly, got {self.lr_schedule!r}",
            ),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (
                self.momentum is None
                if self.optimizer == "adam"
                else self.momentum is not None and 0 <= self.momentum < 1,
                f"momentum must be in [0, 1) with SGD and unset with Adam, got {self.momentum} with {self.optimizer}",
            ),
            (
                len(self.patch_size) == 3 and min(self.patch_size) >= 16,
                f"patch_size must be 3 sizes >= 16, got {self.patch_size}",
            ),
            (self.batch_size >= 1 and self.samples_per_case >= 1, "batch_size and samples_per_case must be >= 1"),
            (self.batch_size % self.samples_per_case == 0, "batch_size must be a multiple of samples_per_case"),
            (0 <= self.sw_overlap < 1, f"sw_overlap must be in [0, 1), got {self.sw_overlap}"),
            (
                self.partial_labels in ("ignore", "background"),
                f"partial_labels must be ignore or background, got {self.partial_labels!r}",
            ),
        ]
        if self.dp_epsilon is not None:
            check_dp_model(self.model.get("norm", "instance"))
            checks += [
                (self.samples_per_case == 1, "DP-SGD draws one patch per case: samples_per_case must be 1"),
                (self.amp != "on", "DP-SGD clips per-case gradients in full precision: amp must be off or auto"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # the jobs' rules, so that a job and its sites agree
        by_name("fg_ratio").validate(self.fg_ratio)
        by_name("spacing").validate(self.spacing)
        by_name("amp").validate(self.amp)
        for name in ("dp_epsilon", "dp_delta", "dp_clip"):
            by_name(name).validate(getattr(self, name))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


def config_from_args(args: argparse.Namespace, total_epochs: int) -> TrainConfig:
    """A TrainConfig from the training options (``brats_fl.cli.train``, ``brats_fl.site.client.site_args``);
    ``total_epochs`` sets the per-epoch poly schedule; an unset ``lr`` or ``momentum`` is the recipe's."""
    values = {
        "recipe": args.recipe,
        "lr": args.lr,
        "momentum": args.momentum,
        "patch_size": args.patch,
        "batch_size": args.batch,
        "fg_ratio": args.fg_ratio,
        "seed": args.seed,
        "total_epochs": total_epochs,
        "threads": args.threads,
        "spacing": args.spacing,
        "amp": args.amp,
    }
    values["model"] = model_args(args.network, args.channels, args.norm, args.multi_head)
    if args.partial_labels:
        values["partial_labels"] = args.partial_labels
    if getattr(args, "dp_epsilon", None) is not None:
        # a case is drawn whole or not at all (one patch of it), and fine-tuning is training too
        values |= {"dp_epsilon": args.dp_epsilon, "dp_delta": args.dp_delta, "dp_clip": args.dp_clip}
        values |= {"samples_per_case": 1, "dp_epochs": total_epochs + (args.finetune_epochs or 0)}
    return TrainConfig.from_dict(values)


def make_train_loader(items: list[dict], config: TrainConfig, cache_dir: Path | None = None) -> DataLoader:
    """The cached, augmenting patch loader that ``config`` describes (patch, batch, sampling, seed, spacing); with
    ``cache_dir`` its deterministic part is kept on disk (``brats_fl.data.loading``)."""
    c = config
    return train_loader(items, c.patch_size, c.batch_size, c.samples_per_case, c.seed, c.fg_ratio, c.spacing, cache_dir)


#: an extra term of the training objective, a function of the model being trained (FedProx's proximal term)
ExtraLoss = Callable[[torch.nn.Module], torch.Tensor]
#: called after every optimiser step with the model and the learning rate of that step (SCAFFOLD's correction)
AfterStep = Callable[[torch.nn.Module, float], None]


class RegionLoss(_Loss):
    """Dice (+ binary cross-entropy) per case and region, averaged over the annotated (case, region) pairs.

    With every region annotated this is MONAI's ``DiceLoss(sigmoid=True)``, or with cross-entropy the mean over the
    regions of MONAI's ``DiceCELoss(sigmoid=True)`` on each region's channel (the nnU-Net recipe's Dice + CE, with
    nnU-Net's weights of 1 and 1). Not ``DiceCELoss`` on all three channels at once: there its cross-entropy is
    a softmax over the channels, which would treat the nested regions WT > TC > ET as exclusive classes. Written
    around MONAI's per-channel Dice because MONAI's losses mask voxels, not whole channels per sample, and a
    region a site did not annotate must give no gradient at all, not a push towards background. A torch ``_Loss``,
    as MONAI's losses are, so that loss-typed helpers (FLARE's ``PTDittoHelper``) take it.
    """

    def __init__(self, with_ce: bool, squared: bool = False):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=squared, reduction="none")
        self.with_ce = with_ce

    def forward(self, logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of logits (B, 3, X, Y, Z), or of a deep-supervised network's outputs stacked (B, levels, 3, X, Y,
        Z; DynUNet in training, every level at full size): then each level's loss, weighed 1, 1/2, 1/4, ... from the
        output (MONAI's ``DeepSupervisionLoss`` weights, nnU-Net's) and normalised to sum 1, as nnU-Net does."""
        if logits.dim() == label.dim() + 1:
            levels = logits.unbind(1)
            weights = DeepSupervisionLoss(self.dice, weight_mode="exp").get_weights(len(levels))
            total = sum(weights)
            return sum(w / total * self._loss(out, label, annotated) for w, out in zip(weights, levels, strict=True))
        return self._loss(logits, label, annotated)

    def _loss(self, logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor | None) -> torch.Tensor:
        per_region = self.dice(logits, label).flatten(1)  # (B, C)
        if self.with_ce:
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, label, reduction="none")
            per_region = per_region + bce.flatten(2).mean(-1)
        if annotated is None:
            return per_region.mean()
        weights = annotated.to(per_region)
        return (per_region * weights).sum() / weights.sum().clamp_min(1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of mixed precision ``mode`` on ``device``, None for full precision.

    A GPU runs bfloat16 where it has it (Ampere and later), float16 with loss scaling on older ones; a CPU runs
    bfloat16 when asked (``on``), which torch's CPU autocast supports, and full precision by default, where bfloat16
    is rarely faster. Not float16 where bfloat16 exists: on an H200 (``benchmarks/gpu_amp.py``, docs/performance.md)
    the default U-Net's float16 forward pass overflowed after 9 to 10 epochs in 2 of 3 seeds; the loss turned NaN,
    loss scaling skipped every step until its scale reached 0, and the weights became NaN. bfloat16 has float32's
    range, trained all three seeds and needs no loss scaling."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not gpu_has_bfloat16(device):
        return torch.float16
    return torch.bfloat16


def gpu_has_bfloat16(device: torch.device) -> bool:
    """Whether the GPU computes in bfloat16 natively (compute capability 8.0, Ampere, or later)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


class Trainer:
    """Holds a network, its optimiser and loss across calls, so an FL client keeps optimiser state between rounds."""

    def __init__(self, config: TrainConfig, model: BratsNet | None = None, device: torch.device | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        set_determinism(seed=config.seed)
        self.device = device or default_device()
        self.model = (model or build_model(config.model)).to(self.device)
        self.use_precision(amp_dtype(config.amp, self.device))
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(),
                lr=config.lr,
                momentum=config.momentum,
                # plain SGD at momentum 0 (torch refuses Nesterov without momentum)
                nesterov=config.momentum > 0,
                weight_decay=config.weight_decay,
            )
        # sigmoid per region: WT, TC and ET overlap, so they are three binary problems, not one softmax
        self.loss_fn = RegionLoss(with_ce=config.loss == "dice_ce", squared=config.loss == "dice_squared")
        self.epochs_done = 0
        #: DP-SGD, set up at the first training call, which tells how many cases the site has (``_private``)
        self.dp: DPSGD | None = None
        self._dp_state: dict | None = None
        if config.dp_epsilon is not None:
            # Opacus clips per-case gradients in full precision
            self.use_precision(None)

    def reset_optimizer(self) -> None:
        """Forget the optimiser's state (Adam's moments and step count, SGD's momentum), keeping its settings and
        rate: a site that starts a round afresh from the model it received."""
        self.optimizer.state.clear()

    def use_precision(self, dtype: torch.dtype | None) -> None:
        """Train and infer under autocast to ``dtype`` (None: full precision), with loss scaling for float16 alone:
        its gradients underflow without it, while bfloat16 has float32's range. Starts a new loss scale."""
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

    def recalibrate_norm(self, loader: DataLoader) -> int:
        """Re-estimate every batch-norm layer's running statistics from scratch by one pass over ``loader``'s images
        with the weights the model holds now (torch's ``update_bn``, which SWA runs after averaging weights); returns
        the batches seen. Statistics estimated under other weights misnormalise in evaluation, while training, which
        normalises each batch by itself, does not show it (HyperSeg Conv + BN, ``brats_fl.site.client``)."""
        seen = 0

        def images():
            nonlocal seen
            for batch in loader:
                seen += 1
                yield batch["image"]

        update_bn(images(), self.model, device=self.device)
        return seen

    def epoch_lr(self, epoch: int) -> float:
        """The rate of epoch ``epoch`` (from 0) when no one else gives one: ``lr``, poly-decayed over
        ``total_epochs`` if the schedule says so."""
        if self.config.lr_schedule == "poly":
            return poly_lr(self.config.lr, epoch, self.config.total_epochs)
        return self.config.lr

    def train_epochs(
        self,
        loader: DataLoader,
        epochs: int = 1,
        max_steps: int | None = None,
        lr: float | None = None,
        extra_loss: ExtraLoss | None = None,
        after_step: AfterStep | None = None,
    ) -> dict[str, float]:
        """Train for ``epochs`` passes (or ``max_steps`` optimiser steps), every one at ``lr`` if given (a server
        round's rate, fine-tuning's), else at ``epoch_lr``; returns mean loss, steps, time, and the rates of the
        first and last epoch (``lr``, ``lr_last``).

        The two hooks let a federated algorithm change local training without this loop knowing it:
        ``extra_loss(model)`` is added to each step's objective (its mean is returned as ``extra_loss``;
        ``train_loss`` stays the segmentation loss alone), ``after_step(model, lr)`` runs after each optimiser step.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        dp = self._private(loader, extra_loss is not None or after_step is not None)
        self.model.train()
        steps, empty, total, extra_total, start = 0, 0, 0.0, 0.0, time.perf_counter()
        rates: list[float] = []
        for _ in range(epochs):
            epoch_steps, finite_steps = 0, 0
            rates.append(self.epoch_lr(self.epochs_done) if lr is None else lr)
            for group in self.optimizer.param_groups:
                group["lr"] = rates[-1]
            for batch in dp.batches(loader) if dp else loader:
                if batch is None:  # an empty Poisson draw: a step of noise alone
                    dp.empty_step()
                    steps, empty = steps + 1, empty + 1
                    continue
                image = batch["image"].to(self.device)
                label = batch["label"].to(self.device).float()
                # the pipeline has zeroed unannotated regions; "background" trains on those zeros
                annotated = None if self.config.partial_labels == "background" else batch[ANNOTATED]
                # DP-SGD's optimiser clears the per-case gradients too
                (dp.optimizer if dp else self.optimizer).zero_grad(set_to_none=True)
                with self.autocast():
                    logits = (dp.module if dp else self.model)(image)
                # the loss in full precision: Dice's sums over a patch lose too much in 16 bits
                loss = self.loss_fn(logits.float(), label, annotated)
                objective = loss
                if extra_loss is not None:
                    extra = extra_loss(self.model)
                    objective = loss + extra
                    extra_total += float(extra.detach())
                if dp:
                    objective.backward()
                    dp.step()
                else:
                    self.scaler.scale(objective).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                if after_step is not None:
                    after_step(self.model, self.optimizer.param_groups[0]["lr"])
                value = float(loss.detach())
                total, finite_steps = total + value, finite_steps + math.isfinite(value)
                steps, epoch_steps = steps + 1, epoch_steps + 1
                if max_steps is not None and steps >= max_steps:
                    break
            self.epochs_done += 1
            self._check_diverged(epoch_steps, finite_steps)
            if max_steps is not None and steps >= max_steps:
                break
        if dp:
            dp.train(False)
        stats = {
            "train_loss": total / max(steps - empty, 1),
            "steps": float(steps),
            "train_time": time.perf_counter() - start,
            "lr": rates[0],
            "lr_last": rates[-1],
        }
        if extra_loss is not None:
            stats["extra_loss"] = extra_total / max(steps, 1)
        if dp:
            stats["dp_empty_steps"] = float(empty)
        return stats

    def _check_diverged(self, steps: int, finite: int) -> None:
        """Stop a training that has diverged, naming it, rather than send a NaN model on (to the server, or into a
        results table as Dice 0). An epoch in which no step had a finite loss has not trained; float16 loss scaling
        skips such steps and halves its scale each time, until the weights themselves turn NaN."""
        weights_finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if (steps and not finite) or not weights_finite:
            what = f"{steps - finite} of {steps} steps gave a non-finite loss"
            if not weights_finite:
                what += " and the weights are no longer finite"
            hint = "--amp off" if self.amp_dtype == torch.float16 else "a lower --lr"
            raise FloatingPointError(f"training diverged in epoch {self.epochs_done}: {what}; try {hint}")

    def _private(self, loader: DataLoader, hooks: bool) -> DPSGD | None:
        """The trainer's DP-SGD (``brats_fl.seg.dp``) when the configuration asks for it, set up on the first call
        from the number of cases ``loader`` holds; None without DP-SGD. A hook's term of the objective (FedProx) or
        change after a step (SCAFFOLD) would bypass the per-case clipping, and is refused."""
        c = self.config
        if c.dp_epsilon is None:
            return None
        if hooks:
            raise ValueError("DP-SGD clips each case's gradient; an extra loss term or an after-step change escapes it")
        if self.dp is None:
            self.dp = DPSGD(
                self.model,
                self.optimizer,
                epsilon=c.dp_epsilon,
                delta=c.dp_delta,
                max_grad_norm=c.dp_clip,
                cases=len(loader.dataset),
                batch_size=c.batch_size,
                epochs=c.dp_epochs or c.total_epochs,
            )
            if self._dp_state is not None:
                self.dp.load_state_dict(self._dp_state)
        self.dp.train(True)
        return self.dp

    def _sliding(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (B, 4, X, Y, Z) on its own grid, by Gaussian-weighted sliding windows of the patch."""
        self.model.eval()
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        with self.autocast():
            logits = sliding_window_inference(
                image.to(self.device),
                roi_size=self.config.patch_size,
                sw_batch_size=self.config.sw_batch_size,
                predictor=self.model,
                overlap=self.config.sw_overlap,
                mode="gaussian",
            )
        return logits.float()

    def autocast(self) -> torch.autocast:
        """Mixed precision where the configuration asks for it (``amp_dtype``), else a no-op."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype))

    @torch.no_grad()
    def infer_case(self, image: torch.Tensor) -> torch.Tensor:
        """Region logits (3, X, Y, Z) of one volume (4, X, Y, Z) on the volume's own grid.

        With ``spacing`` the volume (a MetaTensor, whose affine says its voxel size) is resampled to it, trilinear,
        segmented there, and the logits are resampled back to the volume's grid, trilinear, by both affines (world
        coordinates); thresholding comes after, so a coarse prediction is scored against the label at full size.
        """
        if self.config.spacing is None or self._at_spacing(image):
            return self._sliding(image.unsqueeze(0))[0]
        if not isinstance(image, MetaTensor):
            raise ValueError(f"inference at spacing {self.config.spacing} mm needs the volume's affine (a MetaTensor)")
        # in the orientation training resampled to (brats_fl.data.loading), then back by the affines
        oriented = Orientation(axcodes=BRATS_ORIENTATION, labels=AXIS_LABELS)(image)
        coarse = Spacing(pixdim=(self.config.spacing,) * 3, mode="bilinear")(oriented)
        logits = self._sliding(coarse.unsqueeze(0))[0].cpu()
        back = ResampleToMatch(mode="bilinear")(MetaTensor(logits, affine=coarse.affine), img_dst=image)
        return back.as_tensor().to(self.device)

    def _at_spacing(self, image: torch.Tensor) -> bool:
        """Whether a volume is already on the training grid (a validation loader resampled it)."""
        if not isinstance(image, MetaTensor):
            return False
        oriented = "".join(nib.aff2axcodes(image.affine.numpy())) == BRATS_ORIENTATION
        return oriented and bool(np.allclose(image.pixdim.cpu().numpy(), self.config.spacing, atol=1e-3))

    @torch.no_grad()
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Region logits (B, 3, X, Y, Z) of whole volumes (B, 4, X, Y, Z) on their own grid (``infer_case``)."""
        if self.config.spacing is None:
            return self._sliding(image)
        return torch.stack([self.infer_case(case) for case in decollate_batch(image)])

    @torch.no_grad()
    def evaluate(
        self,
        loader: DataLoader,
        per_case: bool = False,
        min_volume: dict[str, float] | None = None,
        distances: bool = True,
        lesion_rule: str = "auto",
        choice: Choice | None = None,
    ) -> dict:
        """Dice, IoU, HD95 per region and their means, and the mean loss, over whole cases at the labels' own
        resolution; HD95 in mm by each label's voxel size (its affine, where the loader keeps it). ``per_case``
        (a test split) adds each case's scores and the lesion-wise Dice and HD95 by ``lesion_rule`` (``auto``: each
        case's release's; ``brats_fl.seg.metrics``). ``min_volume`` (mm³ per region) removes smaller predicted
        components before scoring (``brats_fl.seg.postprocess``); the same predictions are then also scored as they
        were, without HD95 (``unprocessed_dice_WT``, ``unprocessed_lesion_dice_WT``, ...: the page's row without
        post-processing at a fraction of a second scoring). Without ``distances``, Dice and IoU alone (no HD95,
        lesion-wise or not). ``choice`` adds every case's predictions to a post-processing choice (a site's last
        validation, ``brats_fl.seg.postprocess``) at no further inference."""
        metrics = RegionMetrics(lesion_wise=per_case and distances, distances=distances, lesion_rule=lesion_rule)
        unprocessed = RegionMetrics(lesion_wise=per_case, distances=False, lesion_rule=lesion_rule)
        losses, case_ids = [], []
        for batch in loader:
            label = batch["label"]
            spacing = [tuple(map(float, p)) for p in label.pixdim] if isinstance(label, MetaTensor) else None
            label = torch.as_tensor(label).to(self.device).float()
            logits = self.infer(batch["image"])
            # a region the case's site did not annotate is never scored, whatever the training mode
            losses.append(float(self.loss_fn(logits, label, batch[ANNOTATED])))
            pred = (torch.sigmoid(logits) > 0.5).float()
            releases = batch.get("release")
            if choice is not None:
                for b in range(pred.shape[0]):
                    choice.add(pred[b].bool().cpu().numpy(), label[b].bool().cpu().numpy(),
                               spacing[b] if spacing else (1.0, 1.0, 1.0), batch[ANNOTATED][b].bool().tolist(),
                               releases[b] if releases else None)  # fmt: skip
            if min_volume:
                for b in range(pred.shape[0]):
                    box = tumour_box(pred[b], label[b])
                    unprocessed.update(pred[b : b + 1][box], label[b : b + 1][box], batch[ANNOTATED][b : b + 1],
                                       spacing=[spacing[b]] if spacing else None,
                                       releases=[releases[b]] if releases else None)  # fmt: skip
                pred = remove_small_components(pred, spacing, min_volume)
            for b in range(pred.shape[0]):
                box = tumour_box(pred[b], label[b])
                metrics.update(
                    pred[b : b + 1][box],
                    label[b : b + 1][box],
                    batch[ANNOTATED][b : b + 1],
                    spacing=[spacing[b]] if spacing else None,
                    releases=[releases[b]] if releases else None,
                )
            case_ids.extend(batch["case_id"])
        out: dict = {**metrics.aggregate(), "val_loss": sum(losses) / len(losses)}
        if min_volume:
            out |= {f"{UNPROCESSED}{k}": v for k, v in unprocessed.aggregate().items() if k != "cases"}
        if per_case:
            rows = metrics.per_case()
            if min_volume:
                rows = [row | _unprocessed(raw) for row, raw in zip(rows, unprocessed.per_case(), strict=True)]
            out["per_case"] = [{"case_id": c, **m} for c, m in zip(case_ids, rows, strict=True)]
        return out

    def state_dict(self) -> dict:
        """What training needs besides the weights to go on where it stopped: optimiser moments and the epoch the
        learning-rate schedule has reached."""
        state = {"optimizer": self.optimizer.state_dict(), "epochs_done": self.epochs_done}
        if self.dp is not None or self._dp_state is not None:
            state["dp"] = self.dp.state_dict() if self.dp is not None else self._dp_state
        return state

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state_dict()``'s result (the weights are loaded separately)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.epochs_done = int(state["epochs_done"])
        if "dp" in state:
            # the accountant goes on from every step the site took before, whenever DP-SGD is set up
            self._dp_state = state["dp"]
            if self.dp is not None:
                self.dp.load_state_dict(self._dp_state)

    def save(self, path: Path, **meta) -> None:
        """Save weights with the model config and the spacing it was trained at, so that ``load_model`` and
        inference (``brats_fl.seg.inference``) need nothing else."""
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"model_config": self.model.config(), "state_dict": self.model.state_dict(), "meta": meta}
        torch.save(blob | {"spacing": self.config.spacing}, path)


#: the prefix of a score of the predictions before post-processing (``Trainer.evaluate``)
UNPROCESSED = "unprocessed_"


def _unprocessed(row: dict) -> dict:
    """A case's scores before post-processing, prefixed; its ET volumes and rule are the post-processed row's."""
    return {f"{UNPROCESSED}{k}": v for k, v in row.items() if isinstance(v, float) and not k.startswith("volume_")}


#: voxels kept around the predicted and true tumour when scoring (``tumour_box``): more than the widest dilation a
#: lesion-wise rule applies before it labels components (3 voxels), so that no score sees the cut
BOX_MARGIN = 8


def tumour_box(pred: torch.Tensor, truth: torch.Tensor, margin: int = BOX_MARGIN) -> tuple[slice, ...]:
    """The index of the box around every predicted or true tumour voxel of one case (masks (3, X, Y, Z)), ``margin``
    voxels wider on each side within the volume, for a batch of that case: (all, all, x, y, z).

    Every score is the same on the box as on the whole volume (Dice, IoU and volumes count voxels inside it; surface
    distances and components do not reach past it), and the box is a small part of a 1 mm brain: scoring a trained
    model's test case took about 3.5 s on the whole volume, most of it surface distances and connected components
    over empty brain. A case with no tumour at all keeps a box of ``margin`` voxels per side."""
    occupied = (pred.bool() | truth.bool()).any(0)
    slices = []
    for axis, size in enumerate(occupied.shape):
        other = tuple(a for a in range(occupied.ndim) if a != axis)
        hit = torch.nonzero(occupied.any(dim=other)).flatten()
        low, high = (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)
        slices.append(slice(max(0, low - margin), min(size, high + margin)))
    return (slice(None), slice(None), *slices)


def load_model(path: Path, model_config: dict | None = None) -> BratsNet:
    """Load a model saved by ``Trainer.save`` or a FLARE persistor (``{"model": state_dict}``).

    FLARE's files hold weights only; their config is passed in or found in the job's run record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch model file ({type(err).__name__}: {err})") from err
    if "state_dict" in blob:
        state, config = blob["state_dict"], blob.get("model_config", model_config)
    elif "model" in blob and isinstance(blob["model"], dict):
        state, config = blob["model"], model_config or _flare_model_config(path)
    else:
        raise ValueError(f"{path}: holds neither 'state_dict' nor FLARE's 'model' entry")
    model = build_model(config)
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model config {config}: "
            f"{len(missing)} missing key(s) e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}"
        )
    return model


def _flare_model_config(path: Path) -> dict | None:
    """The model arguments of the FLARE job whose server app folder holds ``path`` (its persistor's config)."""
    config = path.parent / "config" / "config_fed_server.json"
    if not config.is_file():
        return None
    for component in json.loads(config.read_text()).get("components", []):
        model = component.get("args", {}).get("model")
        if not isinstance(model, dict):
            continue
        network = {c.__name__: name for name, c in NETWORKS.items()}.get(str(model.get("path")).rpartition(".")[2])
        if network:
            return {"network": network, **model.get("args", {})}
    return None


def fit(
    trainer: Trainer,
    train: DataLoader,
    val: DataLoader,
    epochs: int,
    out: Path,
    val_every: int = 1,
    log=print,
) -> list[dict]:
    """Train ``epochs`` epochs, validating every ``val_every``; keep the best (mean Dice) and last models.

    Returns the history, one dict per validation, which is also written to ``out/history.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    best = -1.0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        stats = trainer.train_epochs(train, 1)
        if epoch % val_every and epoch != epochs:
            continue
        metrics = trainer.evaluate(val, distances=False)
        row = {"epoch": epoch, "elapsed": time.perf_counter() - start, **stats, **metrics}
        history.append(row)
        log(
            f"epoch {epoch:4d}  train loss {stats['train_loss']:.4f}  val Dice WT {metrics['dice_WT']:.3f} "
            f"TC {metrics['dice_TC']:.3f} ET {metrics['dice_ET']:.3f} mean {metrics['dice_mean']:.3f}"
        )
        if metrics["dice_mean"] > best:
            best = metrics["dice_mean"]
            trainer.save(out / "best_model.pt", epoch=epoch, dice_mean=best)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    trainer.save(out / "last_model.pt", epoch=epochs)
    return history
