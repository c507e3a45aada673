"""Every network's config survives a rebuild from its attributes, and its parameter groups are sound."""

import copy
import inspect

import pytest
import torch
from brats_fl.seg.model import NETWORKS, NORM_GROUPS, NORMS, build_model, model_args, parameter_groups
from brats_fl.seg.trainer import RegionLoss
from brats_fl.settings.params import NETWORK_NAMES, NORM_NAMES

SMALL = (8, 16, 32)


def small(network: str, **settings) -> torch.nn.Module:
    return build_model(model_args(network, SMALL, **settings))


@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_rebuild_from_attributes_as_flare_export_does(network: str):
    model = small(network, norm="batch")
    cls = NETWORKS[network]
    args = {name: getattr(model, name) for name in inspect.signature(cls.__init__).parameters if name != "self"}
    rebuilt = cls(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert build_model(model.config()).config() == model.config()


NORM_LAYERS = {"batch": torch.nn.BatchNorm3d, "instance": torch.nn.InstanceNorm3d, "group": torch.nn.GroupNorm}
#: what each normalisation layer holds in the state dict
NORM_KEYS = {
    "batch": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    "instance": {"weight", "bias"},
    "group": {"weight", "bias"},
}


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_each_norm_builds_and_its_keys_are_the_norm_group(network: str, norm: str):
    """Every normalisation layer is of the chosen kind, with learnable scale and shift; ``norm`` selects each of its
    keys (batch norm's running statistics too) and ``stats`` the non-learnable ones, on every network (with batch
    norm, the SegViz heads' too)."""
    model = small(network, norm=norm, multi_head=norm == "batch").eval()
    assert model(torch.randn(2, 4, 16, 16, 16)).shape == (2, 3, 16, 16, 16)
    keys = set(model.state_dict())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, tuple(NORM_LAYERS.values()))}
    assert layers and all(isinstance(m, NORM_LAYERS[norm]) and m.affine for m in layers.values())
    groups = parameter_groups(model)
    assert set(groups["norm"]) == {f"{n}.{k}" for n in layers for k in NORM_KEYS[norm]} & keys
    learnable = set(dict(model.named_parameters()))
    assert set(groups["stats"]) == set(groups["norm"]) - learnable
    assert bool(groups["stats"]) == (norm == "batch")
    if norm == "group":  # 8 groups wherever the width allows; the U-Net's 3 normalised logits form one
        assert all(m.num_groups == NORM_GROUPS or m.num_channels % NORM_GROUPS for m in layers.values())


def test_the_schema_names_the_models_norms_and_networks():
    assert tuple(NORMS) == NORM_NAMES and tuple(NETWORKS) == NETWORK_NAMES


@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_head_grows_from_the_output_in_the_order_inference_runs(network: str):
    model = small(network)
    one, two = parameter_groups(model, 1)["head"], parameter_groups(model, 2)["head"]
    output = {"unet": "net.model.2.1.conv.unit0.conv", "segresnet": "net.conv_final.2.conv"}.get(
        network, "net.output_block.conv.conv"
    )
    assert f"{output}.weight" in one and set(one) < set(two)
    if network == "segresnet":  # registered after the last residual block, run before it: never in the head
        assert "net.up_layers.1.0.conv2.conv.weight" in two and not any(".up_samples." in k for k in two)
    with pytest.raises(ValueError, match="head_layers"):
        parameter_groups(model, 999)


def test_dynunet_holds_each_tensor_once_and_weighs_its_deep_supervision():
    model = small("dynunet", init_seed=0)
    state = model.state_dict()
    assert not any(k.startswith("net.skip_layers.") for k in state)
    assert len(state) == len({id(t) for t in model.state_dict(keep_vars=True).values()})
    # a fresh model loaded from it computes the same: the layers' second names are filled on loading
    fresh = small("dynunet", init_seed=1)
    fresh.load_state_dict(state)
    x = torch.randn(1, 4, 16, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    # the deep-supervision outputs, which inference never runs, sit with the output in the head
    assert any(k.startswith("net.deep_supervision_heads.") for k in parameter_groups(model, 1)["head"])
    # in training: the output and one deep-supervised level, weighed 2/3 and 1/3
    stacked = model.train()(x)
    assert stacked.shape == (1, 2, 3, 16, 16, 16)
    label = (torch.rand(1, 3, 16, 16, 16) > 0.5).float()
    loss = RegionLoss(with_ce=False)
    expected = 2 / 3 * loss(stacked[:, 0], label) + 1 / 3 * loss(stacked[:, 1], label)
    torch.testing.assert_close(loss(stacked, label), expected)
    loss(stacked, label).backward()
    copy.deepcopy(model)  # FedProx and Ditto copy the trained model


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model({"norm": "layer"})
    with pytest.raises(ValueError, match="multiple of 8, got \\[12, 24, 48\\]"):
        build_model({"channels": [12, 24, 48], "strides": [2, 2], "norm": "group"})
    with pytest.raises(ValueError, match="strides"):
        build_model({"channels": [8, 16, 32], "strides": [2]})
    with pytest.raises(ValueError, match="do not double"):
        model_args("segresnet", (8, 16, 24))
    with pytest.raises(ValueError, match="network must be one of"):
        model_args("vnet")


@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_multi_head_model_has_a_representation_and_one_head_per_region(network: str):
    model = small(network, multi_head=True).eval()
    groups = parameter_groups(model)
    heads = [groups[f"head_{r}"] for r in ("TC", "WT", "ET")]
    assert sorted(k for h in heads for k in h) == sorted(groups["head"])
    assert all(k.startswith("heads.") for k in groups["head"])
    for head in heads:  # two layers each: a normalised 3x3x3 convolution, then the 1x1x1 classifier
        convs = [k for k in head if k.endswith("conv.weight")]
        assert len(convs) == 2 and any(k in groups["norm"] for k in head)
    # each output channel comes from its own head only
    x = torch.randn(1, 4, 16, 16, 16)
    before = model(x)
    with torch.no_grad():
        model.heads["ET"][1].conv.bias += 1.0
    after = model(x)
    assert torch.equal(before[:, :2], after[:, :2]) and not torch.equal(before[:, 2], after[:, 2])
    with pytest.raises(ValueError, match="one head per region"):
        build_model(model_args(network, SMALL, multi_head=True) | {"out_channels": 2})
