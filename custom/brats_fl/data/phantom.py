"""A phantom BraTS cohort: real brain anatomy, synthetic gliomas, four MRI contrasts, per-site scanners.

Real BraTS cannot be downloaded here, so this is the embedded default data. It is built to make
segmentation a real task: anatomy from the MNI152 T1 and tissue templates that nilearn ships, deformed per
case; tumours of varied size, shape and position with oedema, necrotic / non-enhancing core and an
enhancing rim (absent in about a fifth of cases, like low-grade gliomas); contrasts that mimic T1, T1ce,
T2 and FLAIR; and per-site scanner profiles (scale, bias field, contrast, noise, and MONAI's Gibbs and
k-space spike artefacts as in the HyperSeg paper's Appendix D) so that sites differ as hospitals do.
Output uses the BraTS 2020 layout and int16 voxels, like the challenge files.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import GibbsNoise, KSpaceSpikeNoise
from scipy import ndimage

from brats_fl.data.layout import MODALITIES


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
#: one clean site, Gibbs ringing at two strengths, and k-space spikes (log-intensity 13).
SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("clean", 1.00, 0.00, 0.010, 1.00, 0.0, 0.0),
    ScannerProfile("gibbs_weak", 1.15, 0.15, 0.015, 1.10, 0.2, 0.0),
    ScannerProfile("gibbs_strong", 0.85, 0.25, 0.020, 0.90, 0.5, 0.0),
    ScannerProfile("spike", 1.25, 0.20, 0.015, 1.00, 0.0, 13.0),
    ScannerProfile("low_field", 0.70, 0.35, 0.040, 0.85, 0.0, 0.0),
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
}
_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm isotropic, BraTS-like orientation
_SCALE = 1000.0  # int16 voxel value of intensity 1.0


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


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 6) -> np.ndarray:
    """Smooth noise in about [-1, 1]: random values on a coarse grid, spline-upsampled to at most 32 points
    per axis, then trilinearly to the full grid (a full-size spline costs seconds per field on BraTS grids)."""
    grid = rng.standard_normal([coarse] * len(shape)).astype(np.float32)
    mid = ndimage.zoom(grid, max(1, min(4, 32 // coarse)), order=3, mode="mirror")
    field = torch.nn.functional.interpolate(
        torch.from_numpy(mid)[None, None], size=tuple(shape), mode="trilinear", align_corners=True
    )[0, 0].numpy()
    return field / (np.abs(field).max() + 1e-6)


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], np.float32]:
    """Deform the templates (rotation, scaling, smooth warp) and place them in the target grid.

    Returns the tissue maps and brain mask, and the zoom from template to grid (< 1 shrinks the brain;
    float32, so the tumour radius computed from it is float32 too).
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
    target = np.indices(shape, dtype=np.float32).reshape(3, -1) - (np.array(shape)[:, None] - 1) / 2
    coords = (matrix @ target).astype(np.float32) + (src[:, None] - 1) / 2
    warp = 3.0 / zoom  # up to 3 output voxels of smooth displacement
    for axis in range(3):
        coords[axis] += warp * _smooth_field(rng, shape, 5).reshape(-1)
    out = {k: ndimage.map_coordinates(tpl[k], coords, order=1, cval=0.0).reshape(shape) for k in ("gm", "wm", "mask")}
    out["mask"] = out["mask"] > 0.5
    out["gm"] *= out["mask"]
    out["wm"] *= out["mask"]
    out["csf"] = np.clip(out["mask"] - out["gm"] - out["wm"], 0, 1)
    return out, np.float32(zoom)


def _tumour(rng: np.random.Generator, anatomy: dict[str, np.ndarray], zoom: np.float32, enhancing: bool) -> np.ndarray:
    """A glioma label map: oedema (2) around a core that is an enhancing rim (4) over necrosis (1).

    ``zoom`` is the anatomy's template-to-grid zoom: tumour sizes are in template millimetres.
    """
    mask, wm = anatomy["mask"], anatomy["wm"]
    shape = mask.shape
    coords = np.argwhere(mask)
    lo, hi = coords.min(0), coords.max(0)
    centre_box = (lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo))
    candidates = np.argwhere(wm > 0.5)
    inside = np.all((candidates >= centre_box[0]) & (candidates <= centre_box[1]), axis=1)
    candidates = candidates[inside] if inside.any() else coords
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    radius = max(float(rng.uniform(12.0, 36.0) * zoom), 5.0)  # oedema radius, voxels
    axes = radius * rng.uniform(0.75, 1.25, 3)
    reach = int(np.ceil(axes.max() * 1.6))
    box = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, s)) for c, s in zip(centre, shape, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")).astype(np.float32)
    dist = np.sqrt((((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0))
    dist += 0.3 * _smooth_field(rng, dist.shape, 4)  # irregular border
    core_edge = rng.uniform(0.35, 0.6)
    rim = rng.uniform(0.08, 0.18)
    local = np.zeros(dist.shape, np.uint8)
    local[dist < 1.0] = 2
    local[dist < core_edge] = 4 if enhancing else 1
    local[dist < core_edge - (rim if enhancing else 0.0)] = 1
    seg = np.zeros(shape, np.uint8)
    seg[box] = local
    seg[~mask] = 0
    return seg


def _synthesise(
    rng: np.random.Generator, anatomy: dict[str, np.ndarray], seg: np.ndarray, enhancing: bool
) -> np.ndarray:
    """Ideal (scanner-free) intensities of the four modalities, (4, X, Y, Z)."""
    shape = seg.shape
    images = np.zeros((len(MODALITIES), *shape), np.float32)
    core_tissue = "necrosis" if enhancing else "nonenhancing"
    for m in range(len(MODALITIES)):
        img = sum(anatomy[t] * _TISSUE[t][m] for t in ("csf", "gm", "wm"))
        oedema = seg == 2
        img[oedema] = 0.3 * img[oedema] + 0.7 * _TISSUE["oedema"][m]
        img[seg == 1] = _TISSUE[core_tissue][m]
        img[seg == 4] = _TISSUE["enhancing"][m]
        texture = 1.0 + 0.06 * _smooth_field(rng, shape, 12) + 0.04 * _smooth_field(rng, shape, 24)
        images[m] = img * texture
    return images * anatomy["mask"]


def _scanner(rng: np.random.Generator, images: np.ndarray, mask: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Apply a site's scanner: contrast, bias field, scale, Gibbs ringing, k-space spike, Rician noise."""
    shape = mask.shape
    out = np.power(np.clip(images, 0, None), profile.contrast)
    out *= np.exp(profile.bias_field * _smooth_field(rng, shape, 3))[None]
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


def generate_cohort(
    out: Path,
    cases: int,
    sites: int,
    seed: int,
    shape: tuple[int, int, int] = (240, 240, 155),
    prefix: str = "BraTS20_Training",
    profiles: Sequence[str] | None = None,
) -> list[dict]:
    """Write ``cases`` phantom cases spread round-robin over ``sites`` scanner profiles; returns their metadata.

    Site k uses ``profiles[k mod len]`` (names of ``SCANNER_PROFILES``; default all of them in order), so a
    held-out site can be given a scanner no training site has. Deterministic in (seed, case number, sites,
    shape, profiles). Refuses to overwrite an existing case folder.
    """
    if cases < 1 or sites < 1:
        raise ValueError(f"need at least one case and one site, got cases={cases}, sites={sites}")
    by_name = {p.name: p for p in SCANNER_PROFILES}
    unknown = sorted(set(profiles or []) - set(by_name))
    if unknown:
        raise ValueError(f"unknown scanner profile(s) {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in profiles] if profiles else list(SCANNER_PROFILES)
    if min(shape) < 24:
        raise ValueError(f"grid {shape} is too small for a brain with a tumour (at least 24 voxels per axis)")
    out = Path(out)
    ids = [f"{prefix}_{i:03d}" for i in range(1, cases + 1)]
    existing = [str(out / i) for i in ids if (out / i).exists()]
    if existing:
        raise FileExistsError(f"case folder(s) exist already, not overwritten: {', '.join(existing[:3])}")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, case_id in enumerate(ids):
        site = index % sites
        profile = chosen[site % len(chosen)]
        rng = np.random.default_rng([seed, index])
        enhancing = bool(rng.random() >= 0.2)
        anatomy, zoom = _anatomy(rng, shape)
        # everything after the anatomy works in the brain's bounding box: 2-3x fewer voxels
        box = tuple(slice(max(i.min() - 2, 0), i.max() + 3) for i in np.nonzero(anatomy["mask"]))
        anatomy = {k: v[box] for k, v in anatomy.items()}
        seg = np.zeros(shape, np.uint8)
        images = np.zeros((len(MODALITIES), *shape), np.float32)
        seg[box] = _tumour(rng, anatomy, zoom, enhancing)
        ideal = _synthesise(rng, anatomy, seg[box], enhancing)
        images[(slice(None), *box)] = _scanner(rng, ideal, anatomy["mask"], profile)
        folder = out / case_id
        folder.mkdir()
        for m, name in enumerate(MODALITIES):
            data = np.clip(np.rint(images[m] * _SCALE), 0, np.iinfo(np.int16).max).astype(np.int16)
            nib.save(nib.Nifti1Image(data, _AFFINE), str(folder / f"{case_id}_{name}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, _AFFINE), str(folder / f"{case_id}_seg.nii.gz"))
        records.append(
            {
                "case_id": case_id,
                "site": f"site-{site + 1}",
                "scanner": profile.name,
                "grade": "HGG" if enhancing else "LGG",
                "enhancing": enhancing,
                "tumour_voxels": int(np.count_nonzero(seg)),
            }
        )
    _write_metadata(out, records, seed, shape, [chosen[k % len(chosen)] for k in range(sites)])
    return records


def _write_metadata(
    out: Path, records: list[dict], seed: int, shape: tuple[int, int, int], site_profiles: list[ScannerProfile]
) -> None:
    with (out / "name_mapping.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Grade", "BraTS_2020_subject_ID", "scanner", "site"])
        writer.writerows([r["grade"], r["case_id"], r["scanner"], r["site"]] for r in records)
    meta = {"seed": seed, "shape": list(shape), "profiles": [asdict(p) for p in site_profiles], "cases": records}
    (out / "phantom.json").write_text(json.dumps(meta, indent=1) + "\n")
