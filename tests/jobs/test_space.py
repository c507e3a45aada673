"""The search space of ``brats-fl tune``: what each algorithm searches, over which ranges, and how a trial's values
become job parameters within one training budget (no FLARE run)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from brats_fl.jobs.space import apply, budget, epoch_choices, flags, options, space, untuned
from brats_fl.results.benchmark import ALGORITHMS, PROFILES, job_params

#: the full profile at a budget of 10 epochs per case, so that the numbers below stay small whatever its own budget
FULL = replace(PROFILES["full"], params={**PROFILES["full"].params, "rounds": 10, "local_epochs": 1})
CI = PROFILES["ci"]


def _names(job: str, profile=CI) -> list[str]:
    return [d.name for d in space(job, job_params(profile, job, 0))]


def test_each_algorithm_searches_what_its_papers_tune():
    assert all(_names(job)[0] == "lr" for job in ALGORITHMS)
    for job in ("brats_fedadam", "brats_fedyogi", "brats_fedadagrad"):
        assert {"server_lr", "tau"} <= set(_names(job))
    assert "mu" in _names("brats_fedprox") and "ditto_lambda" in _names("brats_ditto")
    for job in ("brats_hyperseg_conv", "brats_hyperseg_conv_bn", "brats_hyperseg_conv_bn_emb"):
        assert {"hn_lr", "warmup_share", "local_epochs"} <= set(_names(job))
    # a parameter only one kind of job uses is searched for those jobs alone
    assert not {"server_lr", "tau", "mu", "ditto_lambda", "hn_lr"} & set(_names("brats_fedavg"))
    # epochs per round only where rounds end in an exchange; a cyclic job's are epochs per visit
    assert _names("brats_central") == _names("brats_local") == _names("brats_swt") == ["lr"]
    assert _names("brats_cyclic") == ["lr", "visit_epochs"]
    assert _names("brats_fedavg") == ["lr", "local_epochs"]


def test_ranges_are_the_literatures():
    dims = {d.name: d for d in space("brats_fedadam", job_params(FULL, "brats_fedadam", 0))}
    assert (dims["server_lr"].low, dims["server_lr"].high, dims["server_lr"].log) == (1e-3, 1.0, True)
    assert (dims["tau"].low, dims["tau"].high) == (1e-5, 1e-1)
    mu = space("brats_fedprox", job_params(FULL, "brats_fedprox", 0))[-1]
    assert (mu.name, mu.low, mu.high) == ("mu", 1e-3, 1.0)
    # the client rate's range follows the recipe: Adam's or SGD's
    nnunet = job_params(FULL, "brats_fedavg", 0)
    from dataclasses import replace

    assert space("brats_fedavg", replace(nnunet, recipe="nnunet"))[0].high == 0.3
    assert space("brats_fedavg", nnunet)[0].high == 3e-2


def test_epoch_choices_split_the_budget_into_two_rounds_or_more():
    assert epoch_choices(6) == (1, 2, 3)
    assert epoch_choices(10) == (1, 2, 5)
    assert epoch_choices(1) == ()


@pytest.mark.parametrize("job", ALGORITHMS)
def test_every_value_of_the_space_makes_a_valid_job_with_the_same_budget(job: str):
    base = job_params(FULL, job, 0)
    dims = space(job, base)
    corners = [{d.name: d.choices[0] if d.choices else d.low for d in dims}]
    corners.append({d.name: d.choices[-1] if d.choices else d.high for d in dims})
    for values in corners:
        params = apply(base, values)  # the schema's checks pass
        epochs = params.visit_epochs * params.passes if params.visit_epochs else params.rounds * params.local_epochs
        assert epochs == budget(base) == 10
        assert params.hypernetwork.warmup_rounds < params.rounds
        assert params.seed == base.seed and params.channels == base.channels


def test_trial_values_set_rounds_passes_and_warm_up():
    base = job_params(FULL, "brats_hyperseg_conv", 0)
    chosen = options(base, {"lr": 1e-3, "local_epochs": 2, "hn_lr": 0.03, "warmup_share": 0.5})
    assert chosen == {"lr": 1e-3, "local_epochs": 2, "hn_lr": 0.03, "rounds": 5, "warmup_rounds": 2}
    params = apply(base, {"lr": 1e-3, "local_epochs": 2, "hn_lr": 0.03, "warmup_share": 0.5})
    assert (params.lr, params.rounds, params.hypernetwork.lr, params.hypernetwork.warmup_rounds) == (1e-3, 5, 0.03, 2)
    cyclic = apply(job_params(FULL, "brats_cyclic", 0), {"lr": 1e-3, "visit_epochs": 5})
    assert (cyclic.visit_epochs, cyclic.passes) == (5, 2)
    assert flags(chosen) == "--lr 0.001 --local-epochs 2 --hn-lr 0.03 --rounds 5 --warmup-rounds 2"


def test_a_value_out_of_the_schemas_rule_is_refused():
    with pytest.raises(ValueError, match="0 < lr < 1"):
        apply(job_params(FULL, "brats_fedavg", 0), {"lr": 1.5})


@pytest.mark.parametrize("job", ["brats_fedadam", "brats_hyperseg_conv", "brats_cyclic", "brats_ditto"])
def test_the_untuned_values_are_the_jobs_defaults(job: str):
    base = job_params(FULL, job, 0)
    values = untuned(job, space(job, base), base)
    assert set(values) == {d.name for d in space(job, base)}
    params = apply(base, values)
    assert params.train_settings() == base.train_settings()
    assert (params.rounds, params.local_epochs, params.hypernetwork) == (base.rounds, base.local_epochs,
                                                                         base.hypernetwork)  # fmt: skip
    assert (params.server_lr, params.tau, params.ditto_lambda) == (base.server_lr, base.tau, base.ditto_lambda)
    assert params.visit_epochs in (None, 5) and (params.passes or 2) == 2
