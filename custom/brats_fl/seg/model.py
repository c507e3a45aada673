"""The 3D U-Net, and the named parameter groups that algorithms use to decide what stays at a site."""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn

from brats_fl.data.labels import REGIONS
from brats_fl.data.layout import MODALITIES

#: GroupNorm's number of groups: MONAI SegResNet's default. Wu and He's 32 does not divide the 16 channels of our
#: first level; 8 groups leave 2 or more channels per group at every level of the default U-Net. Every channel count
#: of the U-Net must be a multiple (``check_norm``); the one layer whose width is not one of them, the 3 logits that
#: the single-head U-Net normalises before its last convolution, gets gcd(3, 8) = 1 group (``_set_groups``)
NORM_GROUPS = 8
#: MONAI's normalisation layers, by the name a job gives (``brats_fl.jobs.params.NORM_NAMES``); all with learnable
#: scale and shift, and batch norm with running statistics too (MONAI's defaults: momentum 0.1, tracked statistics).
#: MONAI gives every layer the same arguments, so group norm is built with 1 group and given its groups per layer
NORMS = {
    "batch": ("batch", {"affine": True}),
    "instance": ("instance", {"affine": True}),
    "group": ("group", {"num_groups": 1, "affine": True}),
}
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


class BratsUNet(nn.Module):
    """MONAI's 3D U-Net with 4 MRI channels in and 3 region logits (REGIONS order) out.

    MONAI's UNet cannot be used directly in a FLARE job: job export rebuilds a model from the attributes
    named like its constructor arguments, and UNet stores ``spatial_dims`` as ``dimensions``. This wrapper
    keeps every argument under its own name. ``norm`` is ``batch``, ``instance`` or ``group`` (``NORMS``); all are
    affine here (MONAI's instance norm is not by default), so FedBN always has normalisation parameters to keep at
    the site, and batch norm adds the running statistics that the FedBN paper keeps there too.

    ``multi_head`` makes the SegViz model: the U-Net becomes a representation block ending in
    ``channels[0]`` features, and a task block holds one head per region (``heads.TC``, ``heads.WT``,
    ``heads.ET``), each a 3x3x3 convolution with normalisation and activation, then a 1x1x1 classifier. A head
    is trained, and aggregated, only where its region is annotated (``brats_fl.server.segviz``).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        norm: str = "instance",
        dropout: float = 0.0,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        init_seed: int | None = None,
        multi_head: bool = False,
    ):
        super().__init__()
        check_norm(norm, channels)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1, got {list(strides)} and {list(channels)}")
        if multi_head and out_channels != len(REGIONS):
            raise ValueError(
                f"a multi-head model has one head per region: out_channels {len(REGIONS)}, not {out_channels}"
            )
        self.channels = list(channels)
        self.strides = list(strides)
        self.num_res_units = num_res_units
        self.norm = norm
        self.dropout = dropout
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_seed = init_seed
        self.multi_head = multi_head
        features = self.channels[0] if multi_head else out_channels
        # a seeded initialisation makes the server's initial global model the same in every run
        with torch.random.fork_rng(enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            self.net = UNet(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=features,
                channels=self.channels,
                strides=self.strides,
                num_res_units=num_res_units,
                norm=NORMS[norm],
                dropout=dropout,
            )
            if multi_head:
                self.heads = nn.ModuleDict({r: self._head(features) for r in REGIONS})
        _set_groups(self)

    def _head(self, features: int) -> nn.Sequential:
        hidden = Convolution(3, features, features, kernel_size=3, norm=NORMS[self.norm], act="PRELU")
        return nn.Sequential(hidden, Convolution(3, features, 1, kernel_size=1, conv_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.multi_head:
            return self.net(x)
        features = self.net(x)
        return torch.cat([self.heads[r](features) for r in REGIONS], dim=1)

    def config(self) -> dict:
        """The constructor arguments, to rebuild the same network elsewhere."""
        return {
            "channels": self.channels,
            "strides": self.strides,
            "num_res_units": self.num_res_units,
            "norm": self.norm,
            "dropout": self.dropout,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "init_seed": self.init_seed,
            "multi_head": self.multi_head,
        }


def check_norm(norm: str, channels: Sequence[int]) -> None:
    """Refuse an unknown normalisation, or group norm where ``NORM_GROUPS`` does not divide a channel count (every
    normalised layer, the SegViz heads included, has one of ``channels``)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    if norm == "group" and any(c % NORM_GROUPS for c in channels):
        raise ValueError(
            f"group norm splits every layer's channels into {NORM_GROUPS} groups: every channel count must be a "
            f"multiple of {NORM_GROUPS}, got {list(channels)}"
        )


def _set_groups(model: nn.Module) -> None:
    """``NORM_GROUPS`` groups in every group norm, or the greatest common divisor where its width is no multiple
    (a GroupNorm's parameters do not depend on its groups, only its forward pass does)."""
    for layer in model.modules():
        if isinstance(layer, nn.GroupNorm):
            layer.num_groups = math.gcd(layer.num_channels, NORM_GROUPS)


def _module_keys(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]


def _unet_paths(model: BratsUNet) -> dict[str, list[nn.Module]]:
    """Walk MONAI's nested UNet: Sequential(down, SkipConnection(Sequential(...) | bottom), up)."""
    groups: dict[str, list[nn.Module]] = {"encoder": [], "bottleneck": [], "decoder": []}
    layer = model.net.model
    ups = []
    while isinstance(layer, nn.Sequential) and len(layer) == 3:
        groups["encoder"].append(layer[0])
        ups.append(layer[2])
        layer = layer[1].submodule
    groups["bottleneck"].append(layer)
    groups["decoder"] = list(reversed(ups))
    return groups


def parameter_groups(model: BratsUNet, head_layers: int = 1) -> dict[str, list[str]]:
    """State-dict keys by role: encoder, bottleneck, decoder, norm, stats, head.

    ``norm`` holds every normalisation key, learnable or not: scale, shift and batch norm's ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (selected by module type, since MONAI's key names carry no "bn").
    ``stats`` holds the running statistics alone (none with instance or group norm). ``head`` holds the last
    ``head_layers`` convolutions counted from the output, with the normalisation and activation parameters between
    them (FedPer's personal layers). A multi-head model's ``head`` is its whole task block (``head_layers`` is then
    ignored), and ``head_TC``, ``head_WT``, ``head_ET`` hold each region's head.
    """
    names = {id(m): n for n, m in model.named_modules()}
    groups = {
        role: [k for m in modules for k in _module_keys(m, names[id(m)])]
        for role, modules in _unet_paths(model).items()
    }
    groups["norm"] = [k for n, m in model.named_modules() if isinstance(m, _NORM_TYPES) for k in _module_keys(m, n)]
    learnable = dict(model.named_parameters())
    groups["stats"] = [k for k in groups["norm"] if k not in learnable]
    if model.multi_head:
        for region, head in model.heads.items():
            groups[f"head_{region}"] = _module_keys(head, f"heads.{region}")
        groups["head"] = [k for r in REGIONS for k in groups[f"head_{r}"]]
        return groups
    ordered = [(n, m) for n, m in model.named_modules() if not list(m.children()) and m.state_dict()]
    conv_positions = [i for i, (_, m) in enumerate(ordered) if isinstance(m, _CONV_TYPES)]
    if not 0 <= head_layers <= len(conv_positions):
        raise ValueError(f"head_layers must be between 0 and {len(conv_positions)}, got {head_layers}")
    start = conv_positions[-head_layers] if head_layers else len(ordered)
    groups["head"] = [k for n, m in ordered[start:] for k in _module_keys(m, n)]
    return groups


def build_model(config: dict | None = None) -> BratsUNet:
    """Build the network from a (possibly partial) config dict."""
    return BratsUNet(**(config or {}))


def fingerprint(state: Mapping[str, object]) -> str:
    """A SHA-256 of a state dict's keys and exact values: shows that two sides hold the very same weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(torch.as_tensor(state[key]).detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_whole(obj: object, path: Path) -> None:
    """``torch.save`` that leaves ``path`` whole or untouched: a process may die while writing what a resumed job
    needs (a temporary file in the same folder, then an atomic rename, as FLARE's persistor saves its model)."""
    with tempfile.NamedTemporaryFile(dir=Path(path).parent, suffix=".partial", delete=False) as partial:
        torch.save(obj, partial)
    Path(partial.name).replace(path)


def state_bytes(state: Mapping[str, object]) -> int:
    """How many bytes the tensors of a state dict hold: what sending it costs before any compression."""
    return sum(torch.as_tensor(v).numel() * torch.as_tensor(v).element_size() for v in state.values())
