"""Glioma-like tumours for the phantom: lobulated cores, oedema that follows white matter, uneven enhancing rims,
cysts, multifocal and non-enhancing (low-grade-like) cases, the mass effect that pushes the anatomy aside, and
the resection cavity of a post-treatment case.

Volumes are drawn in cm³ and reached by thresholding (a lobulated level set for the core, a white-matter-weighted
diffusion front for the oedema, a distance-to-edge field with uneven thickness for the enhancing rim), so the
cohort's volume statistics are set by the parameters below rather than emerging from shapes; docs/explanation/phantom.md
compares them with published BraTS figures. Everything works in the tumour's bounding box: a few percent of the
grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

#: BraTS 2020 training: 76 LGG of 369 cases (name_mapping.csv of the challenge data).
LGG_SHARE = 76 / 369
#: Share of multifocal cases (NCDB, Haque et al., J Clin Neurosci 2020: 17.2% of 45,268 glioblastomas).
MULTIFOCAL_SHARE = 0.17
# Log-normal whole-tumour volume (cm³): median and log-sd, per grade; core / WT and ET / TC ratio ranges.
_WT_MEDIAN = {"HGG": 95.0, "LGG": 70.0}
_WT_LOG_SD = 0.55
_TC_OF_WT = {"HGG": (0.25, 0.65), "LGG": (0.15, 0.60)}
_ET_OF_TC = (0.30, 0.85)
#: Share of the core that a resection removed, in post-treatment cases (``resect``); our choice, not a published figure.
_CAVITY_OF_TC = (0.30, 0.70)


@dataclass
class Glioma:
    """One tumour in a brain-box array: the label map and what the renderer needs beyond it."""

    seg: np.ndarray  # uint8 BraTS labels 0/1/2/4
    infiltration: np.ndarray  # float32 in [0, 1]: how far inside the oedema front a voxel lies (1 at the core)
    cyst: np.ndarray  # bool, fluid-filled parts of the necrosis (still label 1)
    foci: int
    grade: str


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 6) -> np.ndarray:
    """Smooth noise in about [-1, 1]: random values on a coarse grid, spline-upsampled to at most 32 points
    per axis, then trilinearly to the full grid (a full-size spline costs seconds per field on BraTS grids)."""
    grid = rng.standard_normal([coarse] * len(shape)).astype(np.float32)
    mid = ndimage.zoom(grid, max(1, min(4, 32 // coarse)), order=3, mode="mirror")
    field = torch.nn.functional.interpolate(
        torch.from_numpy(mid)[None, None], size=tuple(shape), mode="trilinear", align_corners=True
    )[0, 0].numpy()
    return field / (np.abs(field).max() + 1e-6)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2 + 0.5


def _box(centre: np.ndarray, half: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(max(int(c - half), 0), min(int(np.ceil(c + half)) + 1, s)) for c, s in zip(centre, shape, strict=True)
    )


def _smallest(values: np.ndarray, count: int) -> float:
    """The value at or below which ``count`` of ``values`` lie: thresholds that hit a target volume exactly."""
    count = int(np.clip(count, 1, values.size))
    return float(np.partition(values, count - 1)[count - 1])


def _largest(values: np.ndarray, count: int) -> float:
    """The value at or above which ``count`` of ``values`` lie."""
    return -_smallest(-values, count)


def _lobulated_level(rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    """A level function whose low set is a union of 3-6 ellipsoidal lobes with low-frequency radial noise."""
    grid = np.indices(shape, dtype=np.float32)
    level = np.full(shape, np.inf, np.float32)
    for _ in range(int(rng.integers(3, 7))):
        offset = rng.standard_normal(3)
        offset *= radius * rng.uniform(0.2, 0.7) / (np.linalg.norm(offset) + 1e-6)
        axes = radius * rng.uniform(0.45, 0.85, 3)
        d = sum(((grid[i] - (centre[i] + offset[i])) / axes[i]) ** 2 for i in range(3))
        np.minimum(level, np.sqrt(d), out=level)
    return level + 0.35 * smooth_field(rng, shape, 4)


def _push(anatomy: dict[str, np.ndarray], box: tuple[slice, ...], centre: np.ndarray, radius: float, k: float) -> None:
    """Mass effect: tissue around the core is pushed outward (its maps sampled from nearer the centre).

    The source radius r (1 - k exp(-(r/L)^2)) is monotone for k < 1, so the push never folds tissue over itself;
    the brain mask stays (the skull does not move): CSF takes up the difference.
    """
    shape = tuple(s.stop - s.start for s in box)
    grid = np.indices(shape, dtype=np.float32) - (centre - np.array([s.start for s in box]))[:, None, None, None]
    r = np.sqrt((grid**2).sum(0))
    factor = 1.0 - k * np.exp(-((r / (1.8 * radius)) ** 2))
    coords = grid * factor + (centre - np.array([s.start for s in box]))[:, None, None, None]
    mask = anatomy["mask"][box]
    for key in ("gm", "wm"):
        anatomy[key][box] = ndimage.map_coordinates(anatomy[key][box], coords, order=1, mode="nearest") * mask
    anatomy["csf"][box] = np.clip(mask - anatomy["gm"][box] - anatomy["wm"][box], 0, 1)


def _oedema_front(core: np.ndarray, wm: np.ndarray, mask: np.ndarray, spread: float) -> np.ndarray:
    """Concentration of a diffusion from the core, faster in white matter than grey and stopped by CSF and the
    brain's edge (as in reaction-diffusion glioma models), at half resolution, back to the box's grid.

    Hand-written explicit steps: scipy has no spatially varying diffusion and the box is small.
    """
    half = tuple(slice(None, None, 2) for _ in range(3))
    source = core[half].astype(np.float32)
    speed = (0.04 + 0.96 * np.clip(wm[half], 0, 1) ** 2) * mask[half]
    c = source.copy()
    steps = int(np.clip((spread / 2.0) ** 2 / 1.2, 10, 90))  # box-5 smoothing spreads ~sqrt(2*speed) voxels a step
    for _ in range(steps):
        c += speed * (ndimage.uniform_filter(c, 5, mode="constant") - c)
        np.maximum(c, source, out=c)
    full = torch.nn.functional.interpolate(
        torch.from_numpy(c)[None, None], scale_factor=2.0, mode="trilinear", align_corners=False
    )[0, 0].numpy()
    return full[tuple(slice(0, s) for s in core.shape)] * mask


def grow(
    rng: np.random.Generator, anatomy: dict[str, np.ndarray], zoom: float, lgg_share: float, size_scale: float
) -> Glioma:
    """Grow one glioma in ``anatomy`` (brain-box tissue maps, displaced in place by its mass effect).

    ``zoom`` is the template-to-grid zoom: volumes are in template cm³, so a small grid holds a proportionally small
    tumour. ``size_scale`` scales lengths (a site seeing larger tumours), ``lgg_share`` is the chance of a
    non-enhancing, low-grade-like case.
    """
    mask, wm = anatomy["mask"], anatomy["wm"]
    shape = mask.shape
    grade = "LGG" if rng.random() < lgg_share else "HGG"
    vox_per_cm3 = 1000.0 * float(zoom) ** 3 * size_scale**3
    wt_vox = _WT_MEDIAN[grade] * np.exp(_WT_LOG_SD * rng.standard_normal()) * vox_per_cm3
    wt_vox = min(wt_vox, 0.25 * mask.sum())
    tc_vox = wt_vox * rng.uniform(*_TC_OF_WT[grade])
    et_share = rng.uniform(*_ET_OF_TC) if grade == "HGG" else 0.0
    foci = 1 if rng.random() >= MULTIFOCAL_SHARE else int(rng.choice([2, 3], p=[0.7, 0.3]))

    coords = np.argwhere(mask)
    lo, hi = coords.min(0), coords.max(0)
    candidates = np.argwhere(wm > 0.5)
    central = np.all((candidates >= lo + 0.25 * (hi - lo)) & (candidates <= lo + 0.75 * (hi - lo)), axis=1)
    candidates = candidates[central] if central.any() else coords
    centres = [candidates[rng.integers(len(candidates))].astype(np.float32)]
    shares = np.sort(rng.dirichlet([2.0] * foci))[::-1]
    r_wt = (3 * wt_vox / (4 * np.pi)) ** (1 / 3)
    for _ in range(foci - 1):  # satellites 12-35 template mm away, in white matter
        for _try in range(50):
            direction = rng.standard_normal(3)
            step = rng.uniform(12, 35) * float(zoom) * size_scale + 0.5 * r_wt
            c = np.round(centres[0] + direction / np.linalg.norm(direction) * step).astype(int)
            if np.all(c >= 0) and np.all(c < shape) and wm[tuple(c)] > 0.3:
                centres.append(c.astype(np.float32))
                break
    shares = shares[: len(centres)] / shares[: len(centres)].sum()

    spread = 2.2 * r_wt
    reach = float(np.abs(np.array(centres) - centres[0]).max()) + spread + 4  # the box holds every focus's oedema
    box = _box(centres[0], reach, shape)
    origin = np.array([s.start for s in box], np.float32)
    r_core_main = (3 * tc_vox * shares[0] / (4 * np.pi)) ** (1 / 3)
    _push(anatomy, box, centres[0], max(r_core_main, 1.0), 0.45 if grade == "HGG" else 0.2)
    mbox = mask[box]
    core = np.zeros(mbox.shape, bool)
    for centre, share in zip(centres, shares, strict=True):
        r_core = max((3 * tc_vox * share / (4 * np.pi)) ** (1 / 3), 1.0)
        sub = _box(centre - origin, 1.9 * r_core + 2, mbox.shape)
        local = _lobulated_level(
            rng, tuple(s.stop - s.start for s in sub), centre - origin - [s.start for s in sub], r_core
        )
        inside = mbox[sub]
        if inside.any():
            core[sub] |= (local <= _smallest(local[inside], round(tc_vox * share))) & inside

    wm_box = anatomy["wm"][box]
    front = _oedema_front(core, wm_box, mbox, spread)
    # oedema reaches further along white matter and spares cortex; low-frequency noise makes its border lobulated
    reached = mbox & (front > 1e-5)
    score = np.log(np.maximum(front, 1e-5)) + 2.5 * wm_box + 1.5 * smooth_field(rng, mbox.shape, 6)
    wt = core | ((score >= _largest(score[reached], round(wt_vox))) & reached)
    parts, _ = ndimage.label(wt, np.ones((3, 3, 3), bool))
    wt = np.isin(parts, np.unique(parts[core]))  # oedema stays attached to a focus: no stray islands
    level = score[wt]
    infiltration = np.zeros(mbox.shape, np.float32)
    infiltration[wt] = (level - level.min()) / (level.max() - level.min() + 1e-6)

    local_seg = np.where(wt, 2, 0).astype(np.uint8)
    cyst = np.zeros(mbox.shape, bool)
    if grade == "HGG":
        inner = tuple(slice(max(i.min() - 1, 0), i.max() + 2) for i in np.nonzero(core))  # the EDT's own box
        depth = np.zeros(mbox.shape, np.float32)
        depth[inner] = ndimage.distance_transform_edt(core[inner]) / (
            1.0 + 0.7 * smooth_field(rng, core[inner].shape, 5)
        )
        rim = core & (depth <= _smallest(depth[core], round(core.sum() * et_share)))
        local_seg[core] = 1
        local_seg[rim] = 4
        necrosis = core & ~rim
        if necrosis.sum() > 30 and rng.random() < 0.6:  # fluid-filled cysts inside the necrosis
            blobs = smooth_field(rng, mbox.shape, 10)
            cyst = necrosis & (blobs >= _largest(blobs[necrosis], round(0.25 * necrosis.sum())))
    else:
        local_seg[core] = 1
    seg = np.zeros(shape, np.uint8)
    seg[box] = local_seg
    full_infiltration = np.zeros(shape, np.float32)
    full_infiltration[box] = infiltration
    full_cyst = np.zeros(shape, bool)
    full_cyst[box] = cyst
    return Glioma(seg, full_infiltration, full_cyst, len(centres), grade)


def resect(rng: np.random.Generator, tumour: Glioma) -> np.ndarray:
    """The resection cavity of a post-treatment case (bool, the tumour's grid): the deepest part of the core, as
    when the surgeon removed the central mass and left a rim of residual tumour (enhancing where the rim enhanced)
    lining a fluid-filled cavity. Its border is uneven (the core's distance to its edge over smooth noise, as the
    enhancing rim's) and its volume a ``_CAVITY_OF_TC`` share of the core."""
    core = (tumour.seg == 1) | (tumour.seg == 4)
    cavity = np.zeros(core.shape, bool)
    if not core.any():
        return cavity
    box = tuple(slice(max(i.min() - 1, 0), i.max() + 2) for i in np.nonzero(core))
    local = core[box]
    depth = ndimage.distance_transform_edt(local) * (1.0 + 0.5 * smooth_field(rng, local.shape, 4))
    share = rng.uniform(*_CAVITY_OF_TC)
    cavity[box] = local & (depth >= _largest(depth[local], round(share * local.sum())))
    return cavity


def trace_cavity(cavity: np.ndarray, thickness: int, lesion: np.ndarray) -> np.ndarray:
    """The cavity an annotator draws: traced at half height on a ``thickness``-mm acquisition (as ``thick_labels``
    traces the regions), and only inside the traced lesion ``lesion``, so that a tighter tracing of the tumour never
    leaves cavity outside it. A site's annotation style loosens or tightens the tumour regions, not the cavity."""
    if thickness > 1:
        cavity = thick_slices(cavity.astype(np.float32), thickness) >= 0.5
    return cavity & lesion


def annotate(seg: np.ndarray, offset_mm: int, mask: np.ndarray) -> np.ndarray:
    """A site's annotation style: every region's boundary traced ``offset_mm`` looser (> 0) or tighter (< 0).

    Each of WT, TC and ET is dilated or eroded by a ball, then nested again (ET in TC in WT), inside the brain.
    """
    if offset_mm == 0 or not seg.any():
        return seg
    pad = abs(offset_mm) + 2
    box = tuple(slice(max(i.min() - pad, 0), i.max() + pad + 1) for i in np.nonzero(seg))
    local, inside = seg[box], mask[box]
    ball = _ball(abs(offset_mm))
    op = ndimage.binary_dilation if offset_mm > 0 else ndimage.binary_erosion
    wt, tc, et = (op(r, ball) & inside for r in (local > 0, (local == 1) | (local == 4), local == 4))
    if offset_mm > 0:
        tc &= wt
        et &= tc
    else:
        tc |= et
        wt |= tc
    out = seg.copy()
    out[box] = np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)
    return out


def thick_slices(volume: np.ndarray, thickness: int, axis: int = -1) -> np.ndarray:
    """A ``thickness``-mm acquisition along ``axis`` resampled to 1 mm: slabs averaged, then linear interpolation
    between slab centres (hand-written: scipy's zoom would not put the samples at the slab centres)."""
    if thickness <= 1:
        return volume
    moved = np.moveaxis(volume, axis, -1)
    n = moved.shape[-1]
    slabs = -(-n // thickness)
    padded = np.concatenate([moved, np.repeat(moved[..., -1:], slabs * thickness - n, axis=-1)], axis=-1)
    means = padded.reshape(*moved.shape[:-1], slabs, thickness).mean(-1)
    pos = np.clip((np.arange(n) - (thickness - 1) / 2) / thickness, 0, slabs - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, slabs - 1)
    w = (pos - i0).astype(np.float32)
    out = means[..., i0] * (1 - w) + means[..., i1] * w
    return np.moveaxis(out.astype(volume.dtype if volume.dtype.kind == "f" else np.float32), -1, axis)


def thick_labels(seg: np.ndarray, thickness: int, axis: int = -1) -> np.ndarray:
    """The labels an annotator draws on a thick-slice image resampled to 1 mm: each nested region's indicator goes
    through the same slab averaging and is traced at half height (partial volume), then nested again."""
    if thickness <= 1 or not seg.any():
        return seg
    wt, tc, et = (
        thick_slices(r.astype(np.float32), thickness, axis) >= 0.5 for r in (seg > 0, (seg == 1) | (seg == 4), seg == 4)
    )
    tc |= et
    wt |= tc
    return np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)


def tumour_stats(seg: np.ndarray, voxel_mm3: float = 1.0, min_component: int = 27) -> dict[str, float]:
    """What docs/explanation/phantom.md compares with the literature, for one label map: WT / TC / ET volumes (cm³), the
    ET / TC and TC / WT ratios, WT sphericity, and the number of WT and of TC components of at least ``min_component``
    voxels (26-connected; multifocal gliomas have several cores joined by oedema, multicentric ones separate WTs).

    Sphericity is pi^(1/3) (6V)^(2/3) / A (1 for a ball). A is the count of exposed voxel faces times 2/3, which
    removes on average the staircase's overestimate for surfaces of any orientation (Cauchy's projection
    formula); hand-written as marching cubes (scikit-image) is not a dependency here.
    """
    wt, tc, et = seg > 0, (seg == 1) | (seg == 4), seg == 4
    vol = {k: float(r.sum()) * voxel_mm3 / 1000 for k, r in (("wt", wt), ("tc", tc), ("et", et))}
    padded = np.pad(wt, 1)
    faces = sum(int(np.count_nonzero(np.diff(padded, axis=a))) for a in range(3))
    area = 2 / 3 * faces * voxel_mm3 ** (2 / 3)
    volume_mm3 = vol["wt"] * 1000

    def parts(region: np.ndarray) -> int:
        labels, n = ndimage.label(region, np.ones((3, 3, 3), bool))
        return int((np.bincount(labels.ravel())[1:] >= min_component).sum()) if n else 0

    return {
        "wt_cm3": vol["wt"],
        "tc_cm3": vol["tc"],
        "et_cm3": vol["et"],
        "et_over_tc": vol["et"] / vol["tc"] if vol["tc"] else float("nan"),
        "tc_over_wt": vol["tc"] / vol["wt"] if vol["wt"] else float("nan"),
        "sphericity": float(np.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area) if area else float("nan"),
        "components": parts(wt),
        "core_components": parts(tc),
    }


@dataclass(frozen=True)
class Raters:
    """How far two raters' tracings of one glioma disagree (the hard phantom's annotation, ``rate``), in template mm
    (scaled to the grid by its zoom): each region's boundary moves by a smooth random field of this SD plus
    a systematic offset of the rater (normal, ``offset_mm`` SD), and each small enhancing focus is labelled ET
    with chance ``focus_seen``. Where raters of BraTS disagree (Menze et al., IEEE TMI 2015): the edge of
    infiltrative oedema, the most; non-enhancing tumour against oedema (the low-grade core); the edge between necrosis
    and the enhancing rim; small enhancing foci. Amplitudes chosen so that two raters' Dice falls in Menze et al.'s
    inter-rater range (docs/explanation/phantom.md measures it)."""

    oedema_mm: float = 2.0
    core_mm: float = 2.2
    nonenhancing_mm: float = 2.5
    rim_mm: float = 0.65
    offset_mm: float = 0.5
    #: an ET component smaller than this (template mm³) is a small focus
    focus_mm3: float = 150.0
    focus_seen: float = 0.6


def _moved(rng: np.random.Generator, region: np.ndarray, amplitude: float, offset: float) -> np.ndarray:
    """``region`` with its boundary moved outward by ``offset`` + smooth noise of SD ``amplitude`` (voxels; negative
    inward): the set where the signed distance to the boundary (positive outside) is below that displacement."""
    if not region.any():
        return region
    signed = ndimage.distance_transform_edt(~region) - ndimage.distance_transform_edt(region)
    noise = smooth_field(rng, region.shape, 6)
    return signed < offset + amplitude * noise / (noise.std() + 1e-6)


def add_foci(rng: np.random.Generator, tumour: Glioma, zoom: float) -> Glioma:
    """The hard phantom's small enhancing foci: 0-4 nodules of 1-2.5 template mm radius in the oedema near a
    high-grade core (where its infiltration is high), labelled ET; the label map changes in place and is returned."""
    seg = tumour.seg
    near = (seg == 2) & (tumour.infiltration > 0.6)
    count = int(rng.integers(0, 5)) if tumour.grade == "HGG" and near.any() else 0
    candidates = np.argwhere(near)
    for _ in range(count):
        centre = candidates[rng.integers(len(candidates))]
        radius = max(rng.uniform(1.0, 2.5) * float(zoom), 0.6)
        ball = _ball(int(np.ceil(radius)))
        box = _box(centre.astype(np.float32), ball.shape[0] // 2, seg.shape)
        offsets = [slice(s.start - int(c) + ball.shape[0] // 2, s.stop - int(c) + ball.shape[0] // 2)
                   for s, c in zip(box, centre, strict=True)]  # fmt: skip
        local = seg[box]
        local[ball[tuple(offsets)] & (local == 2)] = 4
    return tumour


def rate(rng: np.random.Generator, tumour: Glioma, mask: np.ndarray, zoom: float, raters: Raters) -> np.ndarray:
    """One rater's label map (BraTS 2020 values) of ``tumour``: WT, TC and ET each traced with its boundary moved
    (``Raters``), small enhancing foci labelled ET or left as what surrounds them, then nested again (ET in TC in WT)
    inside the brain. A low-grade core is non-enhancing tumour, whose edge against oedema raters place less surely."""
    seg = tumour.seg
    if not seg.any():
        return seg.copy()
    pad = int(np.ceil(3 * max(raters.oedema_mm, raters.nonenhancing_mm) * zoom)) + 3
    box = tuple(slice(max(i.min() - pad, 0), i.max() + pad + 1) for i in np.nonzero(seg))
    local, inside = seg[box], mask[box]
    wt, tc, et = local > 0, (local == 1) | (local == 4), local == 4
    parts, n = ndimage.label(et, np.ones((3, 3, 3), bool))
    sizes = np.bincount(parts.ravel())[1:]
    small = np.flatnonzero(sizes < raters.focus_mm3 * zoom**3) + 1
    unseen = np.isin(parts, small[rng.random(len(small)) >= raters.focus_seen]) if n else np.zeros_like(et)
    # a focus the rater takes for no enhancement is what surrounds it: oedema, or core inside the core
    core_kept = ndimage.binary_dilation(local == 1, np.ones((3, 3, 3), bool))
    et &= ~unseen
    tc &= ~(unseen & ~core_kept)
    edge_mm = raters.nonenhancing_mm if tumour.grade == "LGG" else raters.core_mm
    scale = float(zoom)

    def moved(region: np.ndarray, amplitude_mm: float) -> np.ndarray:
        offset = rng.normal(0.0, raters.offset_mm) * scale
        return _moved(rng, region, amplitude_mm * scale, offset) & inside

    wt_r, tc_r, et_r = moved(wt, raters.oedema_mm), moved(tc, edge_mm), moved(et, raters.rim_mm)
    tc_r &= wt_r
    et_r &= tc_r
    out = seg.copy()
    out[box] = np.where(et_r, 4, np.where(tc_r, 1, np.where(wt_r, 2, 0))).astype(np.uint8)
    return out
