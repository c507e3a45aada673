"""A phantom BraTS cohort: real brain anatomy, glioma-like tumours, four MRI contrasts, sites that differ.

Real BraTS cannot be downloaded here, so this is the embedded default data. It is built to make segmentation a
real task: anatomy from the MNI152 T1 and tissue templates that nilearn ships, deformed per case; gliomas
(``brats_fl.data.glioma``) with lobulated cores, oedema that spreads along white matter, uneven enhancing rims,
cysts, multifocal and non-enhancing low-grade-like cases and mass effect; contrasts that mimic T1, T1ce, T2 and
FLAIR. Sites differ through named knobs (``SiteKnobs``): the scanner (scale, bias field, contrast, noise, and
MONAI's Gibbs and k-space spike artefacts as in the HyperSeg paper's Appendix D), tumour biology (size, share of
low-grade cases), acquisition (thick axial slices) and annotation style (looser or tighter tracing); how many
cases each site holds is the partition's business (``brats_fl.data.cohorts``).
Output uses the folder and file names and the label values of a BraTS release (``brats_fl.data.layout.RELEASES``,
2020 by default) and int16 voxels, like the challenge files; the same seed gives the same cases in every release,
except that 2024's post-treatment cases may have a resection cavity (``glioma.resect``) where the others have core.
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import GibbsNoise, KSpaceSpikeNoise
from scipy import ndimage

from brats_fl.data import layout
from brats_fl.data.glioma import (
    LGG_SHARE,
    Glioma,
    Raters,
    add_foci,
    annotate,
    grow,
    rate,
    resect,
    smooth_field,
    thick_labels,
    thick_slices,
    trace_cavity,
)
from brats_fl.data.labels import Convention, convention
from brats_fl.data.layout import MODALITIES, PHANTOM_RELEASES, SEG


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner distorts the ideal image; zero turns an artefact off."""

    name: str
    intensity_scale: float
    bias_field: float
    noise_std: float
    contrast: float
    gibbs_alpha: float
    kspace_spike: float


#: Site k of K uses profile k mod len. The first four follow HyperSeg's Appendix D:
#: one clean site, Gibbs ringing at two strengths, and k-space spikes (log-intensity 13); then a noisy low-field
#: scanner, with and without spikes.
SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("clean", 1.00, 0.00, 0.010, 1.00, 0.0, 0.0),
    ScannerProfile("gibbs_weak", 1.15, 0.15, 0.015, 1.10, 0.2, 0.0),
    ScannerProfile("gibbs_strong", 0.85, 0.25, 0.020, 0.90, 0.5, 0.0),
    ScannerProfile("spike", 1.25, 0.20, 0.015, 1.00, 0.0, 13.0),
    ScannerProfile("low_field", 0.70, 0.35, 0.040, 0.85, 0.0, 0.0),
    ScannerProfile("low_field_spike", 0.70, 0.35, 0.040, 0.85, 0.0, 13.0),
)

# Mean intensity of each tissue per modality (T1, T1ce, T2, FLAIR), on a scale where WM in T1 is ~0.8.
_TISSUE = {
    "csf": (0.25, 0.27, 1.25, 0.12),
    "gm": (0.55, 0.57, 0.65, 0.60),
    "wm": (0.80, 0.82, 0.42, 0.45),
    "oedema": (0.45, 0.47, 1.05, 1.10),
    "necrosis": (0.20, 0.22, 1.30, 0.45),
    "nonenhancing": (0.38, 0.40, 1.00, 0.85),
    "enhancing": (0.50, 1.35, 0.80, 0.85),
    "cyst": (0.15, 0.16, 1.45, 0.20),  # fluid, like CSF
    "cavity": (0.25, 0.27, 1.25, 0.12),  # a resection cavity fills with fluid like CSF
}
#: The hard phantom's non-enhancing tumour: this share of the way from its own intensities to oedema's, so that its
#: edge against oedema shows as faintly as on BraTS's T2 and FLAIR (our choice)
NONENHANCING_TO_OEDEMA = 0.75
_HARD_TISSUE = _TISSUE | {
    "nonenhancing": tuple(
        n + NONENHANCING_TO_OEDEMA * (o - n) for n, o in zip(_TISSUE["nonenhancing"], _TISSUE["oedema"], strict=True)
    )
}
#: The hard phantom's partial volume: a Gaussian blur of this SD (voxels) before the scanner, as a voxel averages
#: the tissues it straddles; and its residual bias field per modality (after BraTS's N4 correction, each contrast keeps
#: a little of its own): exp(this x smooth noise). Our choices.
PARTIAL_VOLUME_SD = 0.8
RESIDUAL_BIAS = 0.2
#: Share of a post-treatment (2024-gli-post) phantom's cases with a resection cavity; our choice: most
#: post-treatment gliomas were resected, some only biopsied or irradiated (no published share used).
CAVITY_SHARE = 0.75
_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm isotropic, BraTS-like orientation
_SCALE = 1000.0  # int16 voxel value of intensity 1.0


@dataclass(frozen=True)
class SiteKnobs:
    """How one site's cases differ from another's; each field is one named knob of site heterogeneity.

    ``scanner``: scanner and intensity profile, a ``SCANNER_PROFILES`` name. ``size_scale`` and ``lgg_share``:
    tumour biology (length scale of the tumours; chance of a non-enhancing, low-grade-like case).
    ``slice_mm``: acquisition, the axial slice thickness simulated (1 = isotropic 1 mm). ``annotation_mm``:
    annotation style, every region traced that many mm looser (> 0) or tighter (< 0).
    """

    name: str
    scanner: str = "clean"
    size_scale: float = 1.0
    lgg_share: float = LGG_SHARE
    slice_mm: int = 1
    annotation_mm: int = 0


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """MNI152 T1 brain mask and GM / WM probability maps, cropped to the brain (loaded once per process)."""
    from nilearn import datasets

    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(mask))
    gm, wm, mask = (a[box].astype(np.float32) for a in (gm, wm, mask))
    total = np.maximum(gm + wm, 1.0)  # keep GM + WM <= 1 so CSF fills the rest of the mask
    return {"gm": gm / total * mask, "wm": wm / total * mask, "mask": mask}


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[dict[str, np.ndarray], tuple[slice, ...], np.float32]:
    """Deform the templates (rotation, scaling, smooth warp) and place them in the target grid.

    Returns the tissue maps and brain mask in the brain's bounding box (2 voxels of margin), that box, and the
    zoom from template to grid (< 1 shrinks the brain). Only the box where the deformed template can land is
    resampled: resampling the whole grid took half of a case's time.
    """
    tpl = _templates()
    src = np.array(tpl["mask"].shape, dtype=np.float32)
    zoom = min(1.0, *(0.88 * np.array(shape) / src))  # a brain fills the grid like in BraTS
    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = rot @ r
    matrix = rot @ np.diag(1.0 / (zoom * rng.uniform(0.92, 1.08, 3)))
    matrix = matrix @ np.diag([-1.0, -1.0, 1.0])  # array axes of the BraTS affine run against MNI's
    centre_t, centre_s = (np.array(shape) - 1) / 2, (src - 1) / 2
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in src], indexing="ij")).reshape(3, -1) - centre_s[:, None]
    landed = np.linalg.solve(matrix, corners) + centre_t[:, None]
    margin = 6  # the smooth warp moves at most ~3 voxels
    reach = tuple(
        slice(max(int(lo) - margin, 0), min(int(np.ceil(hi)) + margin + 1, n))
        for lo, hi, n in zip(landed.min(1), landed.max(1), shape, strict=True)
    )
    sub = tuple(b.stop - b.start for b in reach)
    target = np.indices(sub, dtype=np.float32).reshape(3, -1)
    target += (np.array([b.start for b in reach]) - centre_t)[:, None].astype(np.float32)
    coords = (matrix.astype(np.float32) @ target) + centre_s[:, None].astype(np.float32)
    warp = 3.0 / zoom  # up to 3 output voxels of smooth displacement
    for axis in range(3):
        coords[axis] += warp * smooth_field(rng, sub, 5).reshape(-1)
    # resample only near the brain (a brain fills half its bounding box): find it on a 4x coarser grid first
    coarse = coords.reshape(3, *sub)[:, ::4, ::4, ::4]
    near = ndimage.map_coordinates(tpl["mask"], coarse.reshape(3, -1), order=1).reshape(coarse.shape[1:]) > 0
    near = ndimage.binary_dilation(near, iterations=2)
    for axis in range(3):
        near = np.repeat(near, 4, axis=axis)
    near = near[: sub[0], : sub[1], : sub[2]]
    points = coords[:, near.ravel()]
    sampled = []
    for key in ("gm", "wm", "mask"):
        values = np.zeros(sub, np.float32)
        values[near] = ndimage.map_coordinates(tpl[key], points, order=1)
        sampled.append(values)
    mask = sampled[2] > 0.5
    brain = tuple(slice(max(i.min() - 2, 0), i.max() + 3) for i in np.nonzero(mask))
    mask = mask[brain]
    out = {"gm": sampled[0][brain] * mask, "wm": sampled[1][brain] * mask, "mask": mask}
    out["csf"] = np.clip(mask - out["gm"] - out["wm"], 0, 1)
    box = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(reach, brain, strict=True))
    return out, box, np.float32(zoom)


def _synthesise(
    rng: np.random.Generator,
    anatomy: dict[str, np.ndarray],
    tumour: Glioma,
    cavity: np.ndarray,
    tissue: dict[str, tuple[float, ...]] = _TISSUE,
) -> np.ndarray:
    """Ideal (scanner-free) intensities of the four modalities, (4, X, Y, Z).

    Oedema mixes with the tissue it infiltrates, more so near the core; every tumour region gets its own texture
    (heterogeneous enhancement, necrosis, cysts, a resection ``cavity``'s fluid); one anatomical texture is shared by
    the four modalities. ``tissue``: each tissue's mean intensities (the hard phantom's non-enhancing tumour is
    fainter).
    """
    seg = tumour.seg
    shape = seg.shape
    core_tissue = "necrosis" if tumour.grade == "HGG" else "nonenhancing"
    texture = 1.0 + 0.06 * smooth_field(rng, shape, 12) + 0.04 * smooth_field(rng, shape, 24)
    box = tuple(slice(max(i.min() - 1, 0), i.max() + 2) for i in np.nonzero(seg))
    local = seg[box]
    heterogeneity = 1.0 + 0.15 * smooth_field(rng, local.shape, 8)
    oedema = local == 2
    weight = 0.55 + 0.4 * tumour.infiltration[box][oedema]
    images = np.empty((len(MODALITIES), *shape), np.float32)
    for m in range(len(MODALITIES)):
        img = sum(anatomy[t] * tissue[t][m] for t in ("csf", "gm", "wm"))
        region = img[box]
        region[oedema] = (1 - weight) * region[oedema] + weight * tissue["oedema"][m]
        region[local == 1] = tissue[core_tissue][m]
        region[tumour.cyst[box]] = tissue["cyst"][m]
        region[local == 4] = tissue["enhancing"][m]
        region[cavity[box]] = tissue["cavity"][m]
        region[local > 0] *= heterogeneity[local > 0]
        images[m] = img * texture
    return images * anatomy["mask"]


def _scanner(rng: np.random.Generator, images: np.ndarray, mask: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Apply a site's scanner: contrast, bias field, scale, Gibbs ringing, k-space spike, Rician noise."""
    shape = mask.shape
    out = np.power(np.clip(images, 0, None), profile.contrast)
    out *= np.exp(profile.bias_field * smooth_field(rng, shape, 3))[None]
    out *= profile.intensity_scale
    if profile.gibbs_alpha:
        out = np.asarray(GibbsNoise(alpha=profile.gibbs_alpha)(out), dtype=np.float32)
    if profile.kspace_spike:
        loc = tuple(int(s // 2 + d) for s, d in zip(shape, (shape[0] // 8, shape[1] // 10, 0), strict=True))
        out = np.asarray(KSpaceSpikeNoise(loc=loc, k_intensity=profile.kspace_spike)(out), dtype=np.float32)
    sigma = profile.noise_std * float(out[:, mask].mean())
    noise = rng.standard_normal((2, *out.shape), dtype=np.float32) * sigma
    out = np.sqrt((out + noise[0]) ** 2 + noise[1] ** 2)  # Rician, as MRI magnitude noise is
    return out * mask[None]


def _harder(rng: np.random.Generator, ideal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The hard phantom's images before the scanner: partial volume at every edge, and a residual bias field of
    each modality's own."""
    blurred = ndimage.gaussian_filter(ideal, sigma=(0, *[PARTIAL_VOLUME_SD] * 3))
    bias = np.stack([np.exp(RESIDUAL_BIAS * smooth_field(rng, mask.shape, 3)) for _ in range(len(ideal))])
    return (blurred * bias * mask[None]).astype(np.float32)


def rater_file(seg_file: Path, rater: int) -> Path:
    """Where rater ``rater`` (2, 3, ...) of a hard phantom's case keeps their annotation: beside the case's label file
    (rater 1's), under a name no BraTS layout reads as a case file."""
    name = seg_file.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else seg_file.stem
    return seg_file.with_name(f"{stem}_rater{rater}.nii.gz")


def _cavity_share(labels: Convention, name: str, share: float | None) -> float:
    """The share of cases given a resection cavity: only a release whose labels have one takes a share."""
    if labels.cavity is None:
        if share is not None:
            with_cavity = [r for r in PHANTOM_RELEASES if convention(layout.release(r).convention).cavity is not None]
            raise ValueError(
                f"--cavity-share makes no sense with release {name}: its labels ({labels.describe()}) have no "
                f"resection cavity; only {', '.join(with_cavity)} has"
            )
        return 0.0
    share = CAVITY_SHARE if share is None else share
    if not 0 <= share <= 1:
        raise ValueError(f"--cavity-share is the fraction of cases with a resection cavity, in [0, 1]; got {share}")
    return share


def _write_labels(seg: np.ndarray, cavity: np.ndarray, labels: Convention) -> np.ndarray:
    """The generator's label map (BraTS 2020 values: 1 core, 2 oedema, 4 ET) and cavity mask in ``labels``' values."""
    out = seg.copy()
    out[seg == 4] = labels.et
    if labels.cavity is not None:
        out[cavity] = labels.cavity
    return out


def generate_cases(
    out: Path,
    knobs: Sequence[SiteKnobs],
    seed: int,
    shape: tuple[int, int, int] = (240, 240, 155),
    release: str = "2020",
    cavity_share: float | None = None,
    hard: bool = False,
    raters: int = 1,
    workers: int | None = None,
) -> list[dict]:
    """Write one case per entry of ``knobs`` (case i uses ``knobs[i]``), named and labelled as ``release``
    (one of ``PHANTOM_RELEASES``); returns their metadata.

    ``hard`` makes the phantom hard for the reasons BraTS is (docs/explanation/phantom.md): each case's labels are one
    rater's tracing (``glioma.rate``: the edge of infiltrative oedema, of non-enhancing tumour, between necrosis and
    enhancing rim, small enhancing foci seen or not), with small enhancing foci (``glioma.add_foci``), partial
    volume, a residual bias field per modality and faint non-enhancing tumour. ``raters`` > 1 (hard only) writes
    raters 2, 3, ... of the same cases beside each label file (``rater_file``). Off, the phantom is exactly as before:
    the hard parts draw from random streams of their own.

    A release whose labels have a resection cavity (2024-gli-post) gives ``cavity_share`` of its cases one
    (default ``CAVITY_SHARE``); another release refuses a share. Deterministic in (seed, case number, shape, knobs,
    and for the cavity the release and share). Anatomy, tumour, texture, scanner and cavity draw from separate random
    streams, so the same case number has the same underlying tumour whatever its scanner, acquisition or annotation
    knobs, and the same images and regions in every release unless it has a cavity. Refuses to overwrite an
    existing case folder. ``workers`` processes write the cases (default one) where there are enough of them
    (``PARALLEL_VOXELS``): the same files, in less time.
    """
    if release not in PHANTOM_RELEASES:
        raise ValueError(f"the phantom writes the releases {', '.join(PHANTOM_RELEASES)}, not {release!r}")
    rel = layout.release(release)
    labels = convention(rel.convention)
    share = _cavity_share(labels, release, cavity_share)
    by_name = {p.name: p for p in SCANNER_PROFILES}
    unknown = sorted({k.scanner for k in knobs} - set(by_name))
    if unknown:
        raise ValueError(f"unknown scanner profile(s) {unknown}; known: {sorted(by_name)}")
    if not knobs:
        raise ValueError("need at least one case")
    if min(shape) < 24:
        raise ValueError(f"grid {shape} is too small for a brain with a tumour (at least 24 voxels per axis)")
    if raters < 1 or (raters > 1 and not hard):
        raise ValueError(f"raters={raters}: a hard phantom has 1 or more raters, the easy one a single exact one")
    out = Path(out)
    ids = [rel.case_format.format(i) for i in range(1, len(knobs) + 1)]
    existing = [str(out / i) for i in ids if (out / i).exists()]
    if existing:
        raise FileExistsError(f"case folder(s) exist already, not overwritten: {', '.join(existing[:3])}")
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        (out, case_id, index, knob, seed, tuple(shape), release, share, hard, raters)
        for index, (case_id, knob) in enumerate(zip(ids, knobs, strict=True))
    ]
    workers = min(workers or 1, len(tasks))
    if workers > 1 and len(tasks) * int(np.prod(shape)) >= PARALLEL_VOXELS:
        # spawned, not forked: the caller may have used torch's thread pools, which a forked child can deadlock in
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            records = list(pool.map(_write_case, tasks))
    else:
        records = [_write_case(task) for task in tasks]
    _write_metadata(out, records, seed, shape, list(dict.fromkeys(knobs)), release, share, hard)
    return records


def _annotation(
    tracing: np.ndarray,
    knob: SiteKnobs,
    mask: np.ndarray,
    box: tuple[slice, ...],
    shape: tuple[int, int, int],
    cavity: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A tracing of the tumour (brain box) as the site's acquisition and annotation style leave it, on the whole grid,
    and the resection ``cavity`` (None: none) traced within it."""
    seg = np.zeros(shape, np.uint8)
    seg[box] = annotate(thick_labels(tracing, knob.slice_mm), knob.annotation_mm, mask)
    traced = np.zeros(shape, bool)
    traced[box] = trace_cavity(cavity, knob.slice_mm, seg[box] > 0) if cavity is not None else False
    return seg, traced


def generate_cohort(
    out: Path,
    cases: int,
    sites: int,
    seed: int,
    shape: tuple[int, int, int] = (240, 240, 155),
    profiles: Sequence[str] | None = None,
    release: str = "2020",
    cavity_share: float | None = None,
    hard: bool = False,
    workers: int | None = None,
) -> list[dict]:
    """Write ``cases`` phantom cases spread round-robin over ``sites`` scanner profiles, named and labelled as
    ``release`` (``generate_cases``); returns their metadata.

    Site k uses ``profiles[k mod len]`` (names of ``SCANNER_PROFILES``; default all of them in order), so a
    held-out site can be given a scanner no training site has; the other knobs keep their defaults.
    Deterministic in (seed, case number, sites, shape, profiles). Refuses to overwrite an existing case folder.
    ``hard``: the phantom as hard as BraTS (``generate_cases``); ``workers``: processes that write the cases.
    """
    if cases < 1 or sites < 1:
        raise ValueError(f"need at least one case and one site, got cases={cases}, sites={sites}")
    names = list(profiles) if profiles else [p.name for p in SCANNER_PROFILES]
    per_site = [SiteKnobs(f"site-{k + 1}", scanner=names[k % len(names)]) for k in range(sites)]
    knobs = [per_site[i % sites] for i in range(cases)]
    return generate_cases(out, knobs, seed, shape, release, cavity_share, hard, workers=workers)


COLUMNS = (
    "release", "scanner", "site", "slice_mm", "annotation_mm", "size_scale", "foci", "wt_cm3", "tc_cm3", "et_cm3",
)  # fmt: skip


def _write_metadata(
    out: Path,
    records: list[dict],
    seed: int,
    shape: tuple[int, int, int],
    knobs: list[SiteKnobs],
    release: str,
    cavity_share: float,
    hard: bool,
) -> None:
    """name_mapping.csv (BraTS's columns, its subject id column named by the release's year, then every knob and
    volume of the case, and the cavity's where the release labels one) and phantom.json."""
    columns = [*COLUMNS, *(["rc_cm3"] if "rc_cm3" in records[0] else [])]
    with (out / "name_mapping.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Grade", f"BraTS_{release.split('-')[0]}_subject_ID", *columns])
        writer.writerows([r["grade"], r["case_id"], *(r[c] for c in columns)] for r in records)
    profiles = {p.name: asdict(p) for p in SCANNER_PROFILES if p.name in {k.scanner for k in knobs}}
    meta = {
        "seed": seed,
        "shape": list(shape),
        "release": release,
        "declared": layout.release(release).declared,
        "cavity_share": cavity_share,
        "knobs": [asdict(k) for k in knobs],
        "profiles": list(profiles.values()),
        "cases": records,
    }
    if hard:  # an easy phantom's file stays as it always was
        meta["hard"] = True
    (out / "phantom.json").write_text(json.dumps(meta, indent=1) + "\n")


#: the least work (cases x voxels) that ``generate_cases`` shares among processes: a spawned worker pays about 5 s to
#: import what it needs, a case on the BraTS grid takes about 1.8 s, so eight of those are where sharing starts to pay
PARALLEL_VOXELS = 8 * 240 * 240 * 155


def _one_thread() -> None:
    """A worker of ``generate_cases``: one torch thread (MONAI's k-space artefacts), as many workers as cores."""
    import torch

    torch.set_num_threads(1)


def _write_case(task: tuple) -> dict:
    """Write one case of ``generate_cases`` (its arguments as a tuple, for a process pool); returns its record. Every
    draw comes from the case's own random streams, so a case is the same whichever process writes it."""
    out, case_id, index, knob, seed, shape, release, share, hard, raters = task
    rel = layout.release(release)
    labels = convention(rel.convention)
    by_name = {p.name: p for p in SCANNER_PROFILES}
    streams = [np.random.default_rng([seed, index, k]) for k in range(5)]
    # everything works in the brain's bounding box: 2-3x fewer voxels than the grid
    anatomy, box, zoom = _anatomy(streams[0], shape)
    tumour = grow(streams[1], anatomy, zoom, knob.lgg_share, knob.size_scale)
    if hard:
        hard_stream = np.random.default_rng([seed, index, 5])
        tumour = add_foci(hard_stream, tumour, zoom)
    resected = streams[4].random() < share
    cavity = resect(streams[4], tumour) if resected else np.zeros(tumour.seg.shape, bool)
    ideal = _synthesise(streams[2], anatomy, tumour, cavity, _HARD_TISSUE if hard else _TISSUE)
    mask = anatomy["mask"]
    if hard:
        ideal = _harder(hard_stream, ideal, mask)
    scanned = thick_slices(_scanner(streams[3], ideal, mask, by_name[knob.scanner]), knob.slice_mm) * mask
    # the annotator traces the whole lesion (the cavity as core), then the cavity within it
    tracings = (
        [rate(np.random.default_rng([seed, index, 10 + r]), tumour, mask, zoom, Raters()) for r in range(raters)]
        if hard
        else [tumour.seg]
    )
    annotations = [_annotation(t, knob, mask, box, shape, cavity if resected else None) for t in tracings]
    seg, traced = annotations[0]
    folder = out / case_id
    folder.mkdir()
    for m, name in enumerate(MODALITIES):
        data = np.zeros(shape, np.int16)
        data[box] = np.clip(np.rint(scanned[m] * _SCALE), 0, np.iinfo(np.int16).max)
        nib.save(nib.Nifti1Image(data, _AFFINE), str(folder / rel.file_name(case_id, name)))
    seg_file = folder / rel.file_name(case_id, SEG)
    nib.save(nib.Nifti1Image(_write_labels(seg, traced, labels), _AFFINE), str(seg_file))
    for r, (other, other_traced) in enumerate(annotations[1:], start=2):
        nib.save(nib.Nifti1Image(_write_labels(other, other_traced, labels), _AFFINE), str(rater_file(seg_file, r)))
    # the regions the labels mean: a cavity is in none
    tumorous = (seg > 0) & ~traced
    wt, tc, et = (int(np.count_nonzero(r & tumorous)) for r in (seg > 0, (seg == 1) | (seg == 4), seg == 4))
    record = {
        "case_id": case_id,
        "release": release,
        "site": knob.name,
        "scanner": knob.scanner,
        "grade": tumour.grade,
        "enhancing": et > 0,
        "slice_mm": knob.slice_mm,
        "annotation_mm": knob.annotation_mm,
        "size_scale": knob.size_scale,
        "lgg_share": round(knob.lgg_share, 4),
        "foci": tumour.foci,
        "wt_cm3": round(wt / 1000, 3),
        "tc_cm3": round(tc / 1000, 3),
        "et_cm3": round(et / 1000, 3),
        "tumour_voxels": wt,
    }
    if labels.cavity is not None:
        record["rc_cm3"] = round(int(np.count_nonzero(traced)) / 1000, 3)
    if hard:
        record |= {"hard": True, "raters": raters}
    return record
