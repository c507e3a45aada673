"""The parameter schema: one declaration behind JobParams, the `brats-fl run` options, the sites' configuration and
the checks; a parameter a job does not use is refused; the command line answers without torch or FLARE."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields

import pytest
from brats_fl.cli.main import build_parser, main
from brats_fl.jobs.catalogue import HyperNetParams, JobParams
from brats_fl.jobs.registry import JOBS
from brats_fl.seg.trainer import TrainConfig
from brats_fl.settings.params import HYPERNETWORK, KINDS, PARAMS, by_name, dest, site_defaults
from brats_fl.site.client import site_args


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


@pytest.mark.parametrize(
    ("argv", "job", "option"),
    [
        (["brats_fedavg", "--finetune-epochs", "3"], "brats_fedavg", "--finetune-epochs"),
        (["brats_cyclic", "--personal", "norm"], "brats_cyclic", "--personal"),
        (["brats_swt", "--personal", "none"], "brats_swt", "--personal"),
        (["brats_hyperseg_conv", "--personal", "head:1"], "brats_hyperseg_conv", "--personal"),
        (["brats_fedavg", "--clients-per-round", "2"], "brats_fedavg", "--clients-per-round"),
        (["brats_fedbn", "--hn-depth", "3"], "brats_fedbn", "--hn-depth"),
        (["brats_segviz_fedavg", "--warmup-rounds", "1"], "brats_segviz_fedavg", "--warmup-rounds"),
        (["brats_fedavg", "--passes", "2"], "brats_fedavg", "--passes"),
        (["brats_fedper", "--order", "fixed"], "brats_fedper", "--order"),
        (["brats_local", "--visit-epochs", "2"], "brats_local", "--visit-epochs"),
        (["brats_hyperseg_conv_bn", "--assignment-timeout", "60"], "brats_hyperseg_conv_bn", "--assignment-timeout"),
        (["brats_segviz_fedbn", "--visit-timeout", "60"], "brats_segviz_fedbn", "--visit-timeout"),
    ],
)
def test_run_refuses_a_parameter_the_job_does_not_use(argv: list[str], job: str, option: str, capsys):
    assert main(["run", *argv, "--workspace", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert f"{job} does not use {option}" in err


def test_defaults_are_never_refused(capsys):
    """Only what the user set counts: a job's own parameters pass, and the run then fails later, on bad data."""
    assert main(["run", "brats_cyclic", "--passes", "0"]) == 2
    assert "passes >= 1, got 0" in capsys.readouterr().err


def test_every_job_declares_what_it_uses():
    assert all(job.uses <= set(KINDS) for job in JOBS.values())
    assert {p.uses for p in (*PARAMS, *HYPERNETWORK) if p.uses} == set(KINDS)


def test_every_run_option_has_help_and_a_schema_entry():
    known = {p.flag for p in (*PARAMS, *HYPERNETWORK) if p.flag}
    own = {"-h", "--help", "--site-config", "--workspace", "--verbose", "--numerics"}  # how this machine runs it
    own.add("--preset")  # named values of the schema's own parameters (PRESETS)
    for action in _run_parser()._actions:
        if action.option_strings:
            assert action.help, action.option_strings
            assert set(action.option_strings) <= known | own, action.option_strings
    assert known <= {s for a in _run_parser()._actions for s in a.option_strings}


def test_schema_defaults_are_those_of_jobparams():
    params, hn = JobParams(), HyperNetParams()
    assert {f.name for f in fields(JobParams)} == {p.name for p in PARAMS} | {"hypernetwork"}
    assert all(getattr(params, p.name) == p.default for p in PARAMS)
    assert all(getattr(hn, p.name) == p.default for p in HYPERNETWORK)
    assert TrainConfig().fg_ratio == by_name("fg_ratio").default


def test_client_config_keys_are_known_to_the_sites():
    config = JobParams(resume_from="/x/FL_global_model.pt", audit=True).client_config()
    assert set(config) <= set(site_defaults())
    args = site_args(config | {"job": "brats_fedavg", "personal": "norm"})
    assert (args.patch, args.resume, args.audit, args.personal) == ([64, 64, 64], True, True, "norm")
    with pytest.raises(ValueError, match=r"unknown site parameter\(s\) \['x'\]"):
        site_args({"x": 1})


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01])
def test_fg_ratio_has_one_rule_on_both_sides(value: float):
    with pytest.raises(ValueError, match="0 < fg_ratio <= 1"):
        JobParams(fg_ratio=value)
    with pytest.raises(ValueError, match="0 < fg_ratio <= 1"):
        TrainConfig.from_dict({"fg_ratio": value})
    assert JobParams(fg_ratio=1).fg_ratio == TrainConfig.from_dict({"fg_ratio": 1}).fg_ratio == 1


def test_cli_options_build_jobparams():
    from brats_fl.settings.params import from_cli

    argv = ["brats_hyperseg_conv", "--patch", "32", "32", "32", "--hn-lr", "0.01", "--privacy-arg", "a=1", "b=x"]
    values = vars(_run_parser().parse_args(argv))
    job, hn = from_cli(values)
    assert job == {"patch_size": (32, 32, 32), "privacy_args": {"a": 1, "b": "x"}}
    assert hn == {"lr": 0.01}
    assert {dest(p) for p in PARAMS if p.flag} >= {"patch", "batch", "fg_ratio"}


def test_names_from_flare_and_torch_classes_match_the_schema():
    from brats_fl.seg.trainer import RECIPES
    from brats_fl.server.hyperseg import OPTIMISERS
    from brats_fl.server.sequential import ORDERS
    from brats_fl.transfer.filters import PRIVACY, QUANTIZATION

    assert by_name("privacy").choices == ("none", *PRIVACY)
    assert by_name("quantize").choices == ("none", *QUANTIZATION)
    assert by_name("recipe").choices == tuple(RECIPES)
    assert by_name("order").choices == ORDERS
    assert next(p for p in HYPERNETWORK if p.name == "optimizer").choices == tuple(OPTIMISERS)


@pytest.mark.parametrize("split", [["10", "2", "0"], ["0.6", "0.2", "0.1"], ["1.2", "-0.1", "-0.1"]])
def test_partition_refuses_a_split_that_is_not_fractions_summing_to_one(split: list[str], tmp_path, capsys):
    out = tmp_path / "lists"
    assert main(["partition", str(tmp_path), "--sites", "2", "--out", str(out), "--split", *split]) == 2
    err = capsys.readouterr().err
    assert "--split takes train/val/test fractions" in err and " ".join(f"{float(v):g}" for v in split) in err
    assert not out.exists()


_HEAVY = "assert not any(m.split('.')[0] in ('torch', 'nvflare', 'monai') for m in sys.modules)"


@pytest.mark.parametrize(
    "code",
    [
        "from brats_fl.cli.main import build_parser; build_parser()",
        "from brats_fl.cli.main import main; main(['check-data', '/nonexistent'])",
        "from brats_fl.cli.main import main; main(['partition', '/nowhere', '--sites', '2', '--out', '/x'])",
        "from brats_fl.cli.main import main; main(['partition', '/nonexistent', '--sites', '2', '--out', '/x', "
        "'--split', '10', '2', '0'])",
    ],
)
def test_help_and_data_commands_import_neither_torch_nor_flare(code: str):
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; {_HEAVY}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_presets_are_jobs_of_the_schema_parameters():
    from brats_fl.settings.params import PRESETS

    for values in PRESETS.values():
        assert set(values) <= {p.name for p in PARAMS}
        JobParams(**values)  # refuses a value out of range
    assert JobParams(**PRESETS["brats18"]).train_settings().lr == 1e-4
