"""The three 3D networks (MONAI's UNet, SegResNet, DynUNet), and the named parameter groups that algorithms use to
decide what stays at a site, on any of them."""

from __future__ import annotations

import hashlib
import inspect
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

from brats_fl.data.labels import REGIONS
from brats_fl.data.layout import MODALITIES

#: GroupNorm's number of groups: MONAI SegResNet's default. Wu and He's 32 does not divide the 16 channels of our
#: first level; 8 groups leave 2 or more channels per group at every level of the default U-Net. Every channel count
#: of the U-Net must be a multiple (``check_norm``); the one layer whose width is not one of them, the 3 logits that
#: the single-head U-Net normalises before its last convolution, gets gcd(3, 8) = 1 group (``_set_groups``)
NORM_GROUPS = 8
#: MONAI's normalisation layers, by the name a job gives (``brats_fl.settings.params.NORM_NAMES``); all with learnable
#: scale and shift, and batch norm with running statistics too (MONAI's defaults: momentum 0.1, tracked statistics).
#: MONAI gives every layer the same arguments, so group norm is built with 1 group and given its groups per layer
NORMS = {
    "batch": ("batch", {"affine": True}),
    "instance": ("instance", {"affine": True}),
    "group": ("group", {"num_groups": 1, "affine": True}),
}
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


class BratsNet(nn.Module):
    """What the three networks share: 4 MRI channels in, 3 region logits (REGIONS order) out, arguments kept under
    their own names, a seeded initialisation, and SegViz's multi-head form.

    FLARE's job export rebuilds a model from the attributes named like its constructor arguments, and MONAI's
    networks store some under other names (UNet's ``spatial_dims`` as ``dimensions``): each wrapper keeps every
    argument as an attribute of the same name. ``multi_head`` makes the SegViz model: the network becomes a
    representation block ending in ``features`` channels, and a task block holds one head per region (``heads.TC``,
    ``heads.WT``, ``heads.ET``), each a 3x3x3 convolution with normalisation and activation, then a 1x1x1
    classifier. A head is trained, and aggregated, only where its region is annotated (``brats_fl.server.segviz``).
    """

    #: the name a job gives the network (``brats_fl.settings.params.NETWORK_NAMES``)
    network = ""

    def _build(self, make_net, features: int, channels: Sequence[int]) -> None:
        """``make_net(out_channels)`` builds MONAI's network; with the heads, under the seed, with norm groups set."""
        check_norm(self.norm, channels)
        if self.multi_head and self.out_channels != len(REGIONS):
            raise ValueError(
                f"a multi-head model has one head per region: out_channels {len(REGIONS)}, not {self.out_channels}"
            )
        # a seeded initialisation makes the server's initial global model the same in every run
        with torch.random.fork_rng(enabled=self.init_seed is not None):
            if self.init_seed is not None:
                torch.manual_seed(self.init_seed)
            self.net = make_net(features if self.multi_head else self.out_channels)
            if self.multi_head:
                self.heads = nn.ModuleDict({r: self._head(features) for r in REGIONS})
        _set_groups(self)

    def _head(self, features: int) -> nn.Sequential:
        hidden = Convolution(3, features, features, kernel_size=3, norm=NORMS[self.norm], act="PRELU")
        return nn.Sequential(hidden, Convolution(3, features, 1, kernel_size=1, conv_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not self.multi_head:
            return out
        if out.dim() == x.dim() + 1:  # DynUNet's deep supervision in training: (B, levels, C, ...), a head per level
            levels = out.flatten(0, 1)
            return torch.cat([self.heads[r](levels) for r in REGIONS], dim=1).unflatten(0, out.shape[:2])
        return torch.cat([self.heads[r](out) for r in REGIONS], dim=1)

    def config(self) -> dict:
        """The constructor arguments and the network's name (``build_model``), to rebuild the same network elsewhere."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {"network": self.network, **{n: _plain(getattr(self, n)) for n in names}}

    def min_size(self) -> int:
        """The smallest edge of an input that every level of the network can halve."""
        raise NotImplementedError

    def beside_output(self) -> list[nn.Module]:
        """Output layers other than the one inference uses (``parameter_groups`` puts them in the head)."""
        return []


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


class BratsUNet(BratsNet):
    """MONAI's 3D U-Net (``UNet``): brats-fl's small default for 2 CPU cores and the phantom.

    ``norm`` is ``batch``, ``instance`` or ``group`` (``NORMS``); all are affine here (MONAI's instance norm is not
    by default), so FedBN always has normalisation parameters to keep at the site, and batch norm adds the running
    statistics that the FedBN paper keeps there too.
    """

    network = "unet"

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
        if len(strides) != len(channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1, got {list(strides)} and {list(channels)}")
        self.channels = list(channels)
        self.strides = list(strides)
        self.num_res_units = num_res_units
        self.norm = norm
        self.dropout = dropout
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_seed = init_seed
        self.multi_head = multi_head

        def unet(out: int) -> UNet:
            return UNet(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=out,
                channels=self.channels,
                strides=self.strides,
                num_res_units=num_res_units,
                norm=NORMS[norm],
                dropout=dropout,
            )

        self._build(unet, self.channels[0], self.channels)

    def min_size(self) -> int:
        return math.prod(self.strides)


class BratsSegResNet(BratsNet):
    """MONAI's ``SegResNet`` (Myronenko, BraTS 2018), with the defaults of NVFlare's BraTS18 example and MONAI's
    brats_mri_segmentation bundle: 16 initial filters doubling per level, 1-2-2-4 residual blocks down and 1-1-1
    up, dropout 0.2 after the first convolution, and group norm of 8 groups (SegResNet's default). Its
    variational-autoencoder branch, used in the 2018 paper for regularisation, is in neither example and not here.
    """

    network = "segresnet"

    def __init__(
        self,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        norm: str = "group",
        dropout: float = 0.2,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        init_seed: int | None = None,
        multi_head: bool = False,
    ):
        super().__init__()
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"need len(blocks_up) == len(blocks_down) - 1, got {blocks_up} and {blocks_down}")
        self.init_filters = init_filters
        self.blocks_down = list(blocks_down)
        self.blocks_up = list(blocks_up)
        self.norm = norm
        self.dropout = dropout
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_seed = init_seed
        self.multi_head = multi_head

        def segresnet(out: int) -> SegResNet:
            return SegResNet(
                spatial_dims=3,
                init_filters=init_filters,
                in_channels=in_channels,
                out_channels=out,
                dropout_prob=dropout or None,
                norm=NORMS[norm],
                blocks_down=tuple(self.blocks_down),
                blocks_up=tuple(self.blocks_up),
            )

        channels = [init_filters * 2**i for i in range(len(self.blocks_down))]
        self._build(segresnet, init_filters, channels)

    def min_size(self) -> int:
        return 2 ** (len(self.blocks_down) - 1)


class BratsDynUNet(BratsNet):
    """MONAI's ``DynUNet`` in nnU-Net's 3D full-resolution shape: per level two 3x3x3 convolutions with instance
    norm (affine) and leaky ReLU, the first level at full resolution and every other one strided by 2, transposed
    convolutions up, and deep supervision on ``deep_supr_num`` decoder levels below the output (nnU-Net weighs every
    decoder level but the lowest; with 6 levels that is 3). nnU-Net's BraTS plan at 128³ has filters 32-64-128-256-
    320-320, its default here. In training the network returns the output and the deep-supervision outputs stacked
    (``brats_fl.seg.trainer.RegionLoss`` weighs them); in evaluation the output alone.

    MONAI's DynUNet registers its layers twice, once more inside ``skip_layers``: its state dict holds every tensor
    under two keys. Here the state dict holds each once (the first name), and loading fills the second, so that a
    site sends, and the server averages, each weight once. ``dropout`` (nnU-Net has none) follows each convolution.
    """

    network = "dynunet"

    def __init__(
        self,
        filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
        deep_supr_num: int = 3,
        norm: str = "instance",
        dropout: float = 0.0,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        init_seed: int | None = None,
        multi_head: bool = False,
    ):
        super().__init__()
        if len(filters) < 2 or not 0 <= deep_supr_num <= len(filters) - 2:
            raise ValueError(
                f"need 2 or more levels and 0 <= deep_supr_num <= levels - 2, got {list(filters)} and {deep_supr_num}"
            )
        self.filters = list(filters)
        self.deep_supr_num = deep_supr_num
        self.norm = norm
        self.dropout = dropout
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_seed = init_seed
        self.multi_head = multi_head
        strides = [1] + [2] * (len(self.filters) - 1)

        def dynunet(out: int) -> DynUNet:
            return DynUNet(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=out,
                kernel_size=[3] * len(strides),
                strides=strides,
                upsample_kernel_size=strides[1:],
                filters=self.filters,
                dropout=dropout or None,
                norm_name=NORMS[norm],
                deep_supervision=deep_supr_num > 0,
                deep_supr_num=max(deep_supr_num, 1),
            )

        self._build(dynunet, self.filters[0], self.filters)
        self._aliases = _aliases(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    def min_size(self) -> int:
        return 2 ** (len(self.filters) - 1)

    def beside_output(self) -> list[nn.Module]:
        return list(self.net.deep_supervision_heads) if self.deep_supr_num else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        # DynUNet keeps the last deep-supervision outputs in a list its layers share: emptied in place, the model holds
        # no activations between steps and can be copied (FedProx's and Ditto's frozen reference)
        self.net.heads[:] = [torch.zeros(1)] * len(self.net.heads)
        return out


def _drop_aliases(module: BratsDynUNet, state: dict, prefix: str, local_metadata: dict) -> None:
    for alias in module._aliases:
        state.pop(prefix + alias, None)


def _fill_aliases(module: BratsDynUNet, state: dict, prefix: str, *args: object) -> None:
    for alias, key in module._aliases.items():
        if prefix + key in state:
            state[prefix + alias] = state[prefix + key]


def _aliases(model: nn.Module) -> dict[str, str]:
    """Each state-dict key that names a tensor an earlier key names too -> that earlier key."""
    first: dict[int, str] = {}
    out = {}
    for key, value in nn.Module.state_dict(model, keep_vars=True).items():
        if id(value) in first:
            out[key] = first[id(value)]
        else:
            first[id(value)] = key
    return out


#: the networks by the name a job gives (``brats_fl.settings.params.NETWORK_NAMES``)
NETWORKS: dict[str, type[BratsNet]] = {c.network: c for c in (BratsUNet, BratsSegResNet, BratsDynUNet)}
#: each network's channels per level when a job sets none: the U-Net's brats-fl default, SegResNet's 16 initial
#: filters doubling over 4 levels (NVFlare's BraTS18 example), nnU-Net's filters for BraTS at 128³
DEFAULT_CHANNELS = {"unet": (16, 32, 64, 128), "segresnet": (16, 32, 64, 128), "dynunet": (32, 64, 128, 256, 320, 320)}


def model_args(
    network: str = "unet",
    channels: Sequence[int] | None = None,
    norm: str | None = None,
    multi_head: bool = False,
    init_seed: int | None = None,
) -> dict:
    """A network's ``build_model`` configuration from a job's settings: its channels per level (None: the network's
    ``DEFAULT_CHANNELS``) and normalisation (None: the network's own); refuses what the network cannot take. The
    channels map onto each network thus: the U-Net's ``channels`` with stride 2 between levels; SegResNet's
    ``init_filters``, which doubles per level, so the channels must double, with 1 block at the first level, 4 at the
    last and 2 between (1-2-2-4 with 4 levels) and 1 up per level; DynUNet's ``filters``, with deep supervision on
    min(3, levels - 2) levels."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    channels = list(channels or DEFAULT_CHANNELS[network])
    if len(channels) < 2 or min(channels) < 1:
        raise ValueError(f"need 2 or more positive channel counts, got {channels}")
    norm = norm or inspect.signature(NETWORKS[network]).parameters["norm"].default
    check_norm(norm, channels)
    args: dict = {"network": network, "norm": norm, "multi_head": multi_head, "init_seed": init_seed}
    levels = len(channels)
    if network == "unet":
        return args | {"channels": channels, "strides": [2] * (levels - 1)}
    if network == "segresnet":
        if any(c != channels[0] * 2**i for i, c in enumerate(channels)):
            raise ValueError(f"SegResNet doubles its filters per level: channels {channels} do not double")
        blocks_down = [1, *[2] * (levels - 2), 4]
        return args | {"init_filters": channels[0], "blocks_down": blocks_down, "blocks_up": [1] * (levels - 1)}
    return args | {"filters": channels, "deep_supr_num": min(3, levels - 2)}


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


def _in_order(model: BratsNet) -> list[tuple[str, nn.Module]]:
    """The layers that hold state, in the order inference runs them: a forward pass of a small input, watched by
    hooks, since the order modules are registered in is not the order they run in (SegResNet's decoder)."""
    layers = [(n, m) for n, m in model.named_modules() if not list(m.children()) and m.state_dict()]
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=n: ran.append(name)) for n, m in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, model.in_channels, *[2 * model.min_size()] * 3))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    by_name = dict(layers)
    return [(n, by_name[n]) for n in dict.fromkeys(ran)]


def parameter_groups(model: BratsNet, head_layers: int = 1) -> dict[str, list[str]]:
    """State-dict keys by role: norm, stats, head, selected by module type, never by key name, on any network.

    ``norm`` holds every normalisation key, learnable or not: scale, shift and batch norm's ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (selected by module type, since MONAI's key names carry no "bn").
    ``stats`` holds the running statistics alone (none with instance or group norm). ``head`` holds the last
    ``head_layers`` convolutions counted from the output in the order inference runs them, with the normalisation and
    activation parameters between them (FedPer's personal layers), and with any of them DynUNet's deep-supervision
    outputs, which sit beside the output and whose outputs inference never uses. A multi-head model's ``head`` is its
    whole task block (``head_layers`` is then ignored), and ``head_TC``, ``head_WT``, ``head_ET`` hold each region's
    head.
    """
    keys = set(model.state_dict())
    groups = {"norm": [k for n, m in model.named_modules() if isinstance(m, _NORM_TYPES) for k in _module_keys(m, n)]}
    groups["norm"] = [k for k in groups["norm"] if k in keys]
    learnable = dict(model.named_parameters())
    groups["stats"] = [k for k in groups["norm"] if k not in learnable]
    if model.multi_head:
        for region, head in model.heads.items():
            groups[f"head_{region}"] = _module_keys(head, f"heads.{region}")
        groups["head"] = [k for r in REGIONS for k in groups[f"head_{r}"]]
        return groups
    ordered = _in_order(model)
    conv_positions = [i for i, (_, m) in enumerate(ordered) if isinstance(m, _CONV_TYPES)]
    if not 0 <= head_layers <= len(conv_positions):
        raise ValueError(f"head_layers must be between 0 and {len(conv_positions)}, got {head_layers}")
    start = conv_positions[-head_layers] if head_layers else len(ordered)
    head = [k for n, m in ordered[start:] for k in _module_keys(m, n)]
    if head_layers:
        names = {id(m): n for n, m in model.named_modules()}
        head += [k for m in model.beside_output() for k in _module_keys(m, names[id(m)])]
    groups["head"] = [k for k in dict.fromkeys(head) if k in keys]
    return groups


def personal_keys(model: BratsNet, spec: str) -> list[str]:
    """The personal state-dict keys of ``model`` under ``spec`` (what stays at a site: the site leaves them out of
    what it loads and sends, ``brats_fl.server.personalise`` says why); refuses an unknown spec. Here, without FLARE,
    because the site, the server and the job catalogue all select by it."""
    if spec == "none":
        return []
    if spec == "all":
        return list(model.state_dict())
    keys: set[str] = set()
    for part in spec.split("+"):
        name, _, count = part.partition(":")
        if name in ("norm", "stats") and not count:
            keys |= set(parameter_groups(model)[name])
        elif name == "head" and count.isdigit() and int(count) > 0:
            keys |= set(parameter_groups(model, head_layers=int(count))["head"])
        else:
            raise ValueError(
                f"unknown personal-key selection {spec!r}; use none, all, head:N, norm, stats or a sum (head:N+norm)"
            )
    return [k for k in model.state_dict() if k in keys]


def head_keys(model: BratsNet) -> dict[str, list[str]]:
    """Each region's head keys of a multi-head model (REGIONS order): what a SegViz site trains and sends for the
    regions it annotates, and what the server averages per region (``brats_fl.server.segviz``)."""
    if not model.multi_head:
        raise ValueError("SegViz needs a multi-head model (multi_head=True)")
    groups = parameter_groups(model)
    return {r: groups[f"head_{r}"] for r in REGIONS}


def describe_keys(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """The layers that hold ``keys``, as ``name (type)``: what a site keeps, in words a reader can check."""
    wanted = set(keys)
    return [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if not list(m.children()) and m.state_dict() and wanted & set(_module_keys(m, n))
    ]


def build_model(config: dict | None = None) -> BratsNet:
    """Build a network from a (possibly partial) config dict; its ``network`` (default ``unet``) picks the class."""
    config = dict(config or {})
    network = config.pop("network", "unet")
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    return NETWORKS[network](**config)


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
