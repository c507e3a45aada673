"""Results of finished runs: the tables the commands print, and ``brats-fl report``'s results.md,
results.csv, figures (drawn by :mod:`brats_fl.results.figures`) and self-contained index.html.

Everything is read from what a run left: the server's run folder (test scores, FLARE's tracking, the run
record written by :mod:`brats_fl.server.run_record`), and the sites' own records where the folder holds them.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from brats_fl.data.labels import DISPLAY_ORDER
from brats_fl.protocol import PERSONALISED_RESULTS, RUN_RECORD, SITE_FOLDER, SITE_RECORD, VISITS_FILE
from brats_fl.seg.inference import SITE_MODEL
from brats_fl.seg.model import state_bytes
from brats_fl.server.records import read_ledger, run_completion, summarise

_COLUMNS = [
    (f"{m}_{r}", f"{label} {r}")
    for m, label in (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95"))
    for r in (*DISPLAY_ORDER, "mean")
]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in rows)])


def format_value(key: str, value: object) -> str:
    """How a table shows a number: HD95 in mm to 2 decimals, scores to 3, counts and bytes whole."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if key.startswith("hd95"):
        return f"{value:.2f}"
    if key in _WHOLE:
        return f"{value:,.0f}"
    return f"{value:.3f}"


_WHOLE = {"sites", "rounds", "bytes_sent_per_site_per_round", "wall_time_s", "cases"}


def format_table(rows: Sequence[tuple[str, dict]], extra: Sequence[str] = ("val_loss",)) -> str:
    """A Markdown table: one row per (name, metrics); Dice/IoU/HD95 per region and mean, then ``extra``."""
    header = ["", *(label for _, label in _COLUMNS), *extra]
    keys = [k for k, _ in _COLUMNS] + list(extra)
    return markdown_table(header, [[name, *(format_value(k, metrics.get(k)) for k in keys)] for name, metrics in rows])


#: cross-site evaluation's name for the last aggregated model
FINAL_GLOBAL = "SRV_FL_global_model.pt"


class IncompleteRunError(ValueError):
    """A run that aborted, failed or was stopped, where a results table must not show it as a result."""


def find_server_run(folder: Path) -> Path:
    """The server's run folder of a finished job inside ``folder`` (simulator workspace or downloaded result)."""
    found = sorted(Path(folder).resolve().rglob(PERSONALISED_RESULTS.as_posix()))
    if not found:
        for record in sorted(Path(folder).resolve().rglob(RUN_RECORD)):
            complete, reason = run_completion(_read_json(record))
            if not complete:
                raise IncompleteRunError(f"{folder}: the run did not complete ({reason}); it left no test scores")
        raise FileNotFoundError(f"{folder}: no finished FLARE job (no {PERSONALISED_RESULTS})")
    if len(found) > 1:
        names = [str(f.parents[1]) for f in found]
        raise ValueError(f"{folder}: holds {len(found)} finished jobs; name one of {names}")
    return found[0].parents[1]


def _pooled(per_site: dict[str, dict]) -> dict[str, float]:
    """Case-weighted means over sites (the same as pooling the test cases) and the worst site's mean Dice.

    With partial labels a site reports only the regions it annotates; each metric is pooled over the sites that
    report it."""
    total = sum(m["cases"] for m in per_site.values())
    keys = dict.fromkeys(k for m in per_site.values() for k in m if k != "cases")
    out = {}
    for key in keys:
        scored = [m for m in per_site.values() if key in m]
        out[key] = sum(m[key] * m["cases"] for m in scored) / sum(m["cases"] for m in scored)
    worst = min(per_site, key=lambda s: per_site[s]["dice_mean"])
    return out | {"cases": float(total), "worst_site": worst, "worst_dice_mean": per_site[worst]["dice_mean"]}


def summarise_run(folder: Path) -> dict:
    """Test metrics of a finished job, pooled and per site, its per-round curves and client figures, and what
    the run was (its run record, the sites' own records where the folder holds them).

    ``test`` scores the model each site ends with (the final global model combined with the site's
    personal layers and fine-tuning, if any) on that site's own test split; ``global_test`` scores the
    final global model with each site's personal layers but without fine-tuning (cross-site evaluation),
    given only where it differs, i.e. where sites fine-tuned.
    """
    run = find_server_run(folder)
    for needed in (PERSONALISED_RESULTS, Path("meta.json")):
        if not (run / needed).exists():
            raise FileNotFoundError(f"{folder}: the run in {run} has no {needed}; did the job finish?")
    personalised = json.loads((run / PERSONALISED_RESULTS).read_text())
    if not personalised:
        raise ValueError(f"{folder}: {run / PERSONALISED_RESULTS} holds no site's test metrics")
    cse_file = run / "cross_site_val" / "cross_val_results.json"  # absent where the job skipped it (cross_site none)
    cse = json.loads(cse_file.read_text()) if cse_file.is_file() else {}
    global_per_site = {s: cse[s][FINAL_GLOBAL] for s in sorted(cse) if FINAL_GLOBAL in cse[s]}
    curves = read_curves(run / "tb_events")
    last = {site: {tag: values[-1] for tag, values in tags.items()} for site, tags in curves.items()}
    # cross-site evaluation combines the global model with each site's personal layers too, so it differs
    # from the personalised scores only where sites fine-tuned, and means nothing where no weight was shared
    if not any(c["bytes_sent"] for c in last.values()) or global_per_site == personalised:
        global_per_site = {}
    record = _read_json(run / RUN_RECORD)
    args = client_args(run, record)
    sites = sorted(personalised)
    site_records = {s: r for s in sites if (r := _site_record(run, s))}
    job = json.loads((run / "meta.json").read_text())["name"]
    complete, reason = run_completion(record)
    return {
        "run": str(run),
        "job": job,
        "complete": complete,
        "incomplete_reason": reason,
        "test": _pooled(personalised),
        "test_per_site": dict(sorted(personalised.items())),
        "global_test": _pooled(global_per_site) if global_per_site else None,
        "global_test_per_site": global_per_site or None,
        "curves": curves,
        "client_train_loss": sum(c["train_loss"] for c in last.values()) / len(last) if last else None,
        "bytes_sent_per_round": max((c["bytes_sent"] for c in last.values()), default=None),
        "traffic": training_traffic(run, curves),
        "algorithm": _algorithm(job, args),
        "partition": _partition(args, site_records),
        "sites": len(sites),
        "rounds": args.rounds if args else max((len(t.get("train_loss", [])) for t in curves.values()), default=None),
        "wall_time": _wall_time(run, record),
        "privacy": summarise(read_ledger(run)),
        "record": record,
        "client_args": vars(args) if args else None,
        "site_records": site_records,
        # each site's post-processing of its final scores: volumes, and which regions took the pooled choice
        "post_processing": {s: r["min_volume"]["personalised"] for s, r in site_records.items() if "min_volume" in r},
    }


def post_processing_lines(summary: dict) -> list[str]:
    """One line per site: the volumes below which its final predictions' components were removed, each marked where
    it was the sites' pooled choice, and the pooled Dice and lesion-wise Dice without and with it."""
    lines = []
    for site, record in summary.get("post_processing", {}).items():
        pooled = set(record.get("pooled", []))
        volumes = ", ".join(f"{r} {record['volumes'][r]:g}{' (pooled)' if r in pooled else ''}" for r in DISPLAY_ORDER)
        lines.append(f"post-processing at {site}: components removed below {volumes} mm³")
    test = summary["test"]
    if "unprocessed_dice_mean" in test and "lesion_dice_mean" in test:
        lines.append(
            f"pooled, without -> with post-processing: Dice mean {test['unprocessed_dice_mean']:.3f} -> "
            f"{test['dice_mean']:.3f}, lesion-wise Dice mean {test['unprocessed_lesion_dice_mean']:.3f} -> "
            f"{test['lesion_dice_mean']:.3f}"
        )
    return lines


def refuse_incomplete(folder: Path, summary: dict, include_incomplete: bool) -> None:
    """Raise IncompleteRunError for a run that did not complete, unless the caller asked to include it (it is then
    marked incomplete wherever it is shown)."""
    if not summary["complete"] and not include_incomplete:
        raise IncompleteRunError(
            f"{folder}: the run did not complete ({summary['incomplete_reason']}); a results table leaves it out "
            "unless --include-incomplete is given"
        )


#: how a table marks a run that did not complete
INCOMPLETE = " (incomplete)"


def training_traffic(run: Path, curves: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, int]]:
    """Bytes of weights each site sent and received during training (the final evaluation, alike for every job,
    left out). Sequential jobs count them visit by visit; the others send their update and receive the whole
    global model once per round."""
    visits = _read_json(run / VISITS_FILE)
    if visits:
        return visits["bytes"]
    state = torch.load(run / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    size = state_bytes(state)
    return {
        site: {"sent": int(sum(tags.get("bytes_sent", []))), "received": size * len(tags.get("train_loss", []))}
        for site, tags in sorted(curves.items())
    }


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def client_args(run: Path, record: dict | None) -> argparse.Namespace | None:
    """The sites' configuration (seed, training settings, personalisation) as the job gave it; None for a run of
    an older brats-fl, whose sites took a command line instead."""
    from brats_fl.site.client import site_args

    config = (record or {}).get("client_config") or _read_json(run / "app_server" / "config" / "config_fed_client.json")
    for executor in (config or {}).get("executors", []):
        site = executor.get("executor", {}).get("args", {}).get("config")
        if site is not None:
            try:
                return site_args(site)
            except ValueError:
                return None
    return None


def _site_record(run: Path, site: str) -> dict | None:
    """A site's own record of the run (site.json), where the folder holds the site's workspace too: the
    simulator's ``<job>/<site>/<run>``, or a POC's ``<site>/<job id>`` next to ``server/<job id>``."""
    folder = run.parents[1] / site / run.name / SITE_FOLDER
    record = _read_json(folder / SITE_RECORD)
    return record | {"dir": str(folder)} if record else None


def _algorithm(job: str, args: argparse.Namespace | None) -> str:
    name = job.removeprefix("brats_")
    if args is None:
        return name
    details = [f"personal {args.personal}"] if args.personal not in ("none", "all") else []
    if args.finetune_epochs:
        details.append(f"fine-tune {args.finetune_scope}, {args.finetune_epochs} ep.")
    return f"{name} ({'; '.join(details)})" if details else name


def partition_name(datalist: dict) -> str:
    """How a datalist's sites were drawn, from the description ``brats-fl partition`` writes into it."""
    scheme = datalist.get("scheme")
    if scheme in ("natural", "dirichlet", "hybrid"):
        alpha = f", alpha {datalist.get('alpha')}" if scheme != "natural" else ""
        return f"{scheme} ({datalist.get('attribute')}{alpha})"
    return scheme or "unknown"


def _partition(args: argparse.Namespace | None, site_records: dict[str, dict]) -> str | None:
    """The partition named in the sites' datalists (None when no site record is at hand)."""
    for record in site_records.values():
        datalist = _read_json(Path(record["data"]["datalist"]))
        if datalist is not None:
            name = partition_name(datalist)
            return f"{name}, pooled as {args.datalist}" if args and args.datalist else name
    return None


def _wall_time(run: Path, record: dict | None) -> float | None:
    """Seconds from the run record, or for older runs from the ``summary.json`` that ``brats-fl run`` wrote."""
    if record and record.get("wall_time") is not None:
        return record["wall_time"]
    summary = _read_json(run.parents[1] / "summary.json")
    return summary.get("wall_time") if summary else None


def read_curves(tb_events: Path) -> dict[str, dict[str, list[float]]]:
    """Every site's scalars per round, as FLARE's tracking delivered them to the server (``tb_events/<site>``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for folder in sorted(p for p in Path(tb_events).glob("*") if p.is_dir()):
        events = EventAccumulator(str(folder))
        events.Reload()
        curves[folder.name] = {
            tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
            for tag in events.Tags()["scalars"]
        }
    return curves


#: the lesion-wise means (BraTS 2023, ``brats_fl.seg.lesions``) of runs that scored them
LESION_COLUMNS = ("lesion_dice_mean", "lesion_hd95_mean")
#: results.csv's columns, in order: what the run was, its pooled test scores, then what it cost
REPORT_COLUMNS = [
    "run", "algorithm", "partition", "sites", "rounds",
    *(k for k, _ in _COLUMNS), *LESION_COLUMNS,
    "worst_site", "worst_site_dice_mean", "client_loss", "bytes_sent_per_site_per_round", "wall_time_s", "privacy",
]  # fmt: skip
_HEADERS = dict(_COLUMNS) | {
    "lesion_dice_mean": "lesion-wise Dice mean",
    "lesion_hd95_mean": "lesion-wise HD95 mean",
    "worst_site": "worst site",
    "worst_site_dice_mean": "worst site Dice",
    "client_loss": "client loss",
    "bytes_sent_per_site_per_round": "bytes/site/round",
    "wall_time_s": "wall time (s)",
    "privacy": "privacy (per site)",
}


def report_row(label: str, summary: dict) -> dict:
    """One run's line of results.csv: the pooled test scores of the model each site ends with."""
    test = summary["test"]
    return {
        "run": label,
        "algorithm": summary["algorithm"],
        "partition": summary["partition"] or "unknown",
        "sites": summary["sites"],
        "rounds": summary["rounds"],
        **{k: test[k] for k, _ in _COLUMNS},
        **{k: test.get(k) for k in LESION_COLUMNS},
        "worst_site": test["worst_site"],
        "worst_site_dice_mean": test["worst_dice_mean"],
        "client_loss": summary["client_train_loss"],
        "bytes_sent_per_site_per_round": summary["bytes_sent_per_round"],
        "wall_time_s": summary["wall_time"],
        "privacy": summary["privacy"]["guarantee"],
    }


def _labels(summaries: Sequence[dict], folders: Sequence[Path]) -> list[str]:
    """Short, distinct names for the runs: the algorithm, then with the partition, then with the folder."""
    options = [
        [s["algorithm"] for s in summaries],
        [f"{s['algorithm']}, {s['partition'] or 'unknown'}" for s in summaries],
        [f"{s['algorithm']} ({Path(f).resolve().name})" for s, f in zip(summaries, folders, strict=True)],
    ]
    for labels in options:
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} #{i}" for i, label in enumerate(options[-1], start=1)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _site_datalists(summary: dict, datalist: Path | None) -> dict[str | None, Path]:
    """Each site's datalist: from the site's own record, else from the user's ``--datalist`` (a file, or a
    folder of ``<site>.json``); the key None marks a file the user gave without saying whose it is."""
    found = {s: Path(r["data"]["datalist"]) for s, r in summary["site_records"].items()}
    if found or datalist is None:
        return found
    if Path(datalist).is_file():
        sites = list(summary["test_per_site"])
        return {sites[0] if len(sites) == 1 else None: Path(datalist)}
    pooled = (summary["client_args"] or {}).get("datalist")
    if pooled:
        return {next(iter(summary["test_per_site"])): Path(datalist) / f"{pooled}.json"}
    return {
        s: Path(datalist) / f"{s}.json" for s in summary["test_per_site"] if (Path(datalist) / f"{s}.json").is_file()
    }


def run_test_cases(summary: dict, data_root: Path | None = None, datalist: Path | None = None) -> dict[str, tuple]:
    """case id -> (MONAI item, site whose test split holds it, or None) for every test case a run can name."""
    from brats_fl.data.datalist import load_datalist

    out = {}
    for site, path in _site_datalists(summary, datalist).items():
        record = summary["site_records"].get(site)
        root = data_root or (Path(record["data"]["data_root"]) if record else None)
        if root is None:
            raise ValueError(f"{path}: give --data-root, the folder its entries are relative to")
        for item in load_datalist(path, root, check=False).items("test"):
            out[item["case_id"]] = (item, site)
    return out


def _model_for(summary: dict, site: str | None) -> tuple[Path, str]:
    """The model a site ends with where its record is at hand, else the final global model, which a job with
    personal layers refuses (``brats_fl.seg.inference.untrained_layers``)."""
    record = summary["site_records"].get(site) if site else None
    if record and (Path(record["dir"]) / SITE_MODEL.name).is_file():
        return Path(record["dir"]) / SITE_MODEL.name, f"{site}'s final model"
    return Path(summary["run"]) / "app_server" / "FL_global_model.pt", "global model"


def overlay_rows(
    case_id: str, runs: Sequence[tuple[str, dict, dict]], threads: int | None = None
) -> tuple[dict, dict, list]:
    """The case's T1ce and FLAIR, its true regions and each run's prediction, through the evaluation's own
    pipeline (brain crop, z-score, sliding window, the site's post-processing), so each row's Dice is the one the run
    recorded. A run
    whose only model at hand is a global model with untrained personal layers is left out, saying why."""
    import torch

    from brats_fl.data.labels import REGIONS
    from brats_fl.data.layout import MODALITIES
    from brats_fl.data.loading import eval_transforms
    from brats_fl.results.figures import OverlayRow
    from brats_fl.seg.inference import UntrainedLayersError, load_for_inference
    from brats_fl.seg.metrics import RegionMetrics
    from brats_fl.seg.postprocess import remove_small_components

    item = next(cases[case_id][0] for _, _, cases in runs if case_id in cases)
    item = {
        "image": [str(p) for p in item["image"]],
        "label": str(item["label"]),
        "release": item.get("release", "other"),
    }
    data = eval_transforms()(item)
    image, truth = data["image"], torch.as_tensor(data["label"]).bool()
    spacing = [tuple(float(v) for v in data["label"].pixdim)]
    images = {m: torch.as_tensor(image[MODALITIES.index(m)]).numpy() for m in ("t1ce", "flair")}
    rows = []
    for label, summary, cases in runs:
        model_path, which = _model_for(summary, cases[case_id][1] if case_id in cases else None)
        patch = tuple((summary["client_args"] or {}).get("patch") or (64, 64, 64))
        try:
            trainer = load_for_inference(model_path, patch, threads)
        except UntrainedLayersError as err:
            print(f"overlay of {case_id}: {label} left out. {err}")
            continue
        pred = (torch.sigmoid(trainer.infer_case(image)) > 0.5).cpu()
        # post-processed as the site's own test scores were (brats_fl.seg.postprocess), where the run records it
        site = cases[case_id][1] if case_id in cases else None
        volumes = (summary.get("post_processing") or {}).get(site, {}).get("volumes")
        if volumes:
            pred = remove_small_components(pred.unsqueeze(0), spacing, volumes)[0]
        metrics = RegionMetrics(distances=False)  # the overlay shows Dice alone
        metrics.update(pred.unsqueeze(0), truth.unsqueeze(0), spacing=spacing)
        scores = metrics.per_case()[0]
        regions = {r: pred[i].numpy() for i, r in enumerate(REGIONS)}
        rows.append(OverlayRow(f"{label}\n({which})", regions, {r: scores[f"dice_{r}"] for r in REGIONS}))
    return images, {r: truth[i].numpy() for i, r in enumerate(REGIONS)}, rows


def write_report(
    folders: Sequence[Path],
    out: Path,
    cases: Sequence[str] | None = None,
    data_root: Path | None = None,
    datalist: Path | None = None,
    threads: int | None = None,
    include_incomplete: bool = False,
) -> Path:
    """results.md, results.csv, the figures and one self-contained index.html for finished runs; a run that did not
    complete is refused (IncompleteRunError) unless ``include_incomplete``, and then marked so.

    Overlays need the test cases' images: a run folder that holds the sites' workspaces (the simulator's,
    a POC's) names them; for results downloaded from the server alone give ``data_root`` and ``datalist``.
    Returns the path of index.html.
    """
    from brats_fl.results.figures import BarSeries, plot_curves, plot_overlay, plot_site_bars

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarise_run(f) for f in folders]
    for folder, summary in zip(folders, summaries, strict=True):
        refuse_incomplete(folder, summary, include_incomplete)
    for summary in summaries:
        if summary["partition"] is None and datalist is not None:
            first = datalist if Path(datalist).is_file() else next(iter(sorted(Path(datalist).glob("*.json"))), None)
            summary["partition"] = partition_name(_read_json(first)) if first else None
    labels = [label + ("" if s["complete"] else INCOMPLETE) for label, s in zip(_labels(summaries, folders), summaries,
                                                                                   strict=True)]  # fmt: skip
    rows = [report_row(label, s) for label, s in zip(labels, summaries, strict=True)]
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = [_HEADERS.get(k, k) for k in REPORT_COLUMNS]
    cells = [[format_value(k, r[k]) for k in REPORT_COLUMNS] for r in rows]
    table = markdown_table(header, cells)
    note = (
        "Test scores pool every site's test cases, each scored by the model its site ends with; HD95 in mm; "
        "client loss is the sites' mean training loss in the last round."
    )
    (out / "results.md").write_text(f"# Results\n\n{note}\n\n{table}\n")

    figures: dict[str, list[tuple[str, Path]]] = {"curves": [], "sites": [], "overlays": []}
    for label, summary in zip(labels, summaries, strict=True):
        shared = bool(summary["bytes_sent_per_round"])
        path = plot_curves(summary["curves"], label, out / f"curves_{_slug(label)}.png", shared)
        figures["curves"].append((f"Learning curves: {label}", path))
    series = []
    for label, summary in zip(labels, summaries, strict=True):
        per_site = {} if (summary["client_args"] or {}).get("datalist") else summary["test_per_site"]
        series.append(BarSeries(label, {s: m["dice_mean"] for s, m in per_site.items()} | {
            "pooled": summary["test"]["dice_mean"]}))  # fmt: skip
        if summary["global_test"]:
            values = {s: m["dice_mean"] for s, m in summary["global_test_per_site"].items()}
            series.append(BarSeries(f"{label}, global model", values | {"pooled": summary["global_test"]["dice_mean"]}))
    path = plot_site_bars(series, "Test Dice (mean of WT, TC, ET)", out / "sites.png")
    figures["sites"].append(
        ("Test Dice per site: each site's final model, and the global model where it differs", path)
    )

    runs = [(label, s, run_test_cases(s, data_root, datalist)) for label, s in zip(labels, summaries, strict=True)]
    available = [set(c) for _, _, c in runs]
    chosen = list(cases or [])
    missing = [c for c in chosen if not any(c in a for a in available)]
    if missing:
        raise ValueError(
            f"test case(s) {missing} not in any run's test split; known: {sorted(set().union(*available))}"
        )
    if not chosen:
        common = sorted(set.intersection(*available)) or sorted(set().union(*available))
        chosen = common[:1]
    for case_id in chosen:
        images, truth, overlay = overlay_rows(case_id, runs, threads)
        if not overlay:
            continue
        path = plot_overlay(case_id, images, truth, overlay, out / f"overlay_{_slug(case_id)}.png")
        figures["overlays"].append((f"Test case {case_id}", path))
    if not chosen:
        print("no overlay: the runs name no test case; give --data-root and --datalist for downloaded results")
    index = out / "index.html"
    index.write_text(_html(labels, summaries, (header, cells), note, figures))
    return index


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _run_facts(summary: dict) -> dict:
    """The lines a reader checks first about a run; the whole record follows them."""
    record = summary["record"] or {}
    git = record.get("git") or {}
    args = summary["client_args"] or {}
    return {
        "job": summary["job"],
        "server run folder": summary["run"],
        "algorithm": summary["algorithm"],
        "partition": summary["partition"] or "unknown",
        "sites, rounds, local epochs": f"{summary['sites']}, {summary['rounds']}, {args.get('local_epochs')}",
        "seed": args.get("seed"),
        "client script arguments": " ".join(f"{k}={v}" for k, v in args.items()),
        "versions": ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items()) or "not recorded",
        "git commit": (git.get("commit", "") + (" (with uncommitted changes)" if git.get("dirty") else ""))
        or "not recorded",
        "code sha256": record.get("code_sha256") or "not recorded",
        "wall time (s)": format_value("wall_time_s", summary["wall_time"]) or "not recorded",
        "complete": "yes" if summary["complete"] else f"no: {summary['incomplete_reason']}",
        "privacy (per site, from the ledger)": summary["privacy"]["guarantee"],
    }


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{font-size:13px;color:#444}pre{font-size:11px;overflow-x:auto;background:#f6f6f6;padding:6px}
.facts td{text-align:left}.row{display:flex;flex-wrap:wrap;gap:1em}.row figure{flex:0 1 520px}"""


def _html(labels: list[str], summaries: list[dict], table: tuple[list, list], note: str, figures: dict) -> str:
    """One page, images embedded, so it can be mailed or archived as a single file."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1])

    def figs(key: str) -> str:
        return "".join(
            f'<figure><img src="{_png(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
            for c, p in figures[key]
        )

    configs = []
    for label, summary in zip(labels, summaries, strict=True):
        facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in _run_facts(summary).items())  # fmt: skip
        record = json.dumps(summary["record"], indent=1) if summary["record"] else "no run record (an older run)"
        configs.append(
            f"<h3>{html.escape(label)}</h3><table class='facts'>{facts}</table>"
            f"<details><summary>run record ({RUN_RECORD})</summary><pre>{html.escape(record)}</pre></details>"
        )
    overlays = figs("overlays") or "<p>No test case at hand: give --data-root and --datalist.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>brats-fl report</title><style>{_CSS}</style></head><body>
<h1>brats-fl report</h1>
<p>{len(summaries)} run(s): {html.escape(", ".join(labels))}.</p>
<h2>Results</h2><p>{html.escape(note)}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Learning curves</h2><div class="row">{figs("curves")}</div>
<h2>Per site</h2>{figs("sites")}
<h2>Overlays</h2><p>True regions solid, predictions dashed; one row per run.</p>{overlays}
<h2>Run configurations</h2>{"".join(configs)}
</body></html>
"""
