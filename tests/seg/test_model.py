"""The network's config survives a rebuild from its attributes, and its parameter groups are sound."""

import inspect

import pytest
import torch
from brats_fl.jobs.params import NORM_NAMES
from brats_fl.seg.model import NORM_GROUPS, NORMS, BratsUNet, build_model, parameter_groups

SMALL = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def test_rebuild_from_attributes_as_flare_export_does():
    model = build_model({**SMALL, "norm": "batch"})
    args = {name: getattr(model, name) for name in inspect.signature(BratsUNet.__init__).parameters if name != "self"}
    rebuilt = BratsUNet(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_output_shape_and_channels():
    model = build_model(SMALL)
    assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_groups_partition_the_state_dict(norm):
    model = build_model({**SMALL, "norm": norm})
    groups = parameter_groups(model)
    keys = set(model.state_dict())
    structural = groups["encoder"] + groups["bottleneck"] + groups["decoder"]
    assert sorted(structural) == sorted(keys) and len(set(structural)) == len(structural)
    assert set(groups["norm"]) <= keys and set(groups["head"]) <= set(groups["decoder"])
    norm_modules = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d))]
    assert len(norm_modules) > 0
    expected = sum(len(m.state_dict()) for m in norm_modules)
    assert len(groups["norm"]) == expected
    if norm == "batch":
        assert any(k.endswith("running_mean") for k in groups["norm"])


NORM_LAYERS = {"batch": torch.nn.BatchNorm3d, "instance": torch.nn.InstanceNorm3d, "group": torch.nn.GroupNorm}
#: what each normalisation layer holds in the state dict
NORM_KEYS = {
    "batch": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    "instance": {"weight", "bias"},
    "group": {"weight", "bias"},
}


@pytest.mark.parametrize("multi_head", [False, True])
@pytest.mark.parametrize("norm", NORM_NAMES)
def test_each_norm_builds_and_its_keys_are_the_norm_group(norm: str, multi_head: bool):
    """Every normalisation layer is of the chosen kind, with learnable scale and shift; ``norm`` selects each of its
    keys (batch norm's running statistics too) and ``stats`` the non-learnable ones."""
    model = build_model({**SMALL, "norm": norm, "multi_head": multi_head})
    assert model(torch.randn(2, 4, 16, 16, 16)).shape == (2, 3, 16, 16, 16)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, tuple(NORM_LAYERS.values()))}
    assert layers and all(isinstance(m, NORM_LAYERS[norm]) and m.affine for m in layers.values())
    groups = parameter_groups(model)
    assert set(groups["norm"]) == {f"{n}.{k}" for n in layers for k in NORM_KEYS[norm]}
    learnable = set(dict(model.named_parameters()))
    assert set(groups["stats"]) == set(groups["norm"]) - learnable
    assert bool(groups["stats"]) == (norm == "batch")
    if norm == "group":  # 8 groups of every U-Net width; the single-head model's 3 normalised logits form one
        assert {(m.num_channels, m.num_groups) for m in layers.values()} == {
            *((c, NORM_GROUPS) for c in SMALL["channels"]),
            *(() if multi_head else ((3, 1),)),
        }


def test_the_schema_names_the_models_norms():
    assert tuple(NORMS) == NORM_NAMES


def test_head_grows_from_the_output():
    model = build_model(SMALL)
    one, two = parameter_groups(model, 1)["head"], parameter_groups(model, 2)["head"]
    last_conv = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)][-1]
    assert f"{last_conv}.weight" in one and set(one) < set(two)
    with pytest.raises(ValueError, match="head_layers"):
        parameter_groups(model, 999)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model({"norm": "layer"})
    with pytest.raises(ValueError, match="multiple of 8, got \\[12, 24, 48\\]"):
        build_model({"channels": [12, 24, 48], "strides": [2, 2], "norm": "group"})
    with pytest.raises(ValueError, match="strides"):
        build_model({"channels": [8, 16, 32], "strides": [2]})


def test_multi_head_model_has_a_representation_and_one_head_per_region():
    model = build_model({**SMALL, "multi_head": True})
    assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    groups = parameter_groups(model)
    keys = set(model.state_dict())
    representation = groups["encoder"] + groups["bottleneck"] + groups["decoder"]
    assert set(representation) | set(groups["head"]) == keys and not set(representation) & set(groups["head"])
    heads = [groups[f"head_{r}"] for r in ("TC", "WT", "ET")]
    assert sorted(k for h in heads for k in h) == sorted(groups["head"])
    for head in heads:  # two layers each: a normalised 3x3x3 convolution, then the 1x1x1 classifier
        convs = [k for k in head if k.endswith("conv.weight")]
        assert len(convs) == 2 and any(k in groups["norm"] for k in head)
    # each output channel comes from its own head only
    x = torch.randn(1, 4, 32, 32, 32)
    before = model(x)
    with torch.no_grad():
        model.heads["ET"][1].conv.bias += 1.0
    after = model(x)
    assert torch.equal(before[:, :2], after[:, :2]) and not torch.equal(before[:, 2], after[:, 2])
    with pytest.raises(ValueError, match="one head per region"):
        build_model({**SMALL, "multi_head": True, "out_channels": 2})
