"""Frechet distances between sample sets in some feature space.

`fid(samples, ref, extractor=None)`:
    samples   (N, C, H, W) float images in [-1, 1]
    ref       a folder of images, an .npz of precomputed statistics (mu, sigma),
              or a tensor of reference images in [-1, 1]
    extractor None for clean-fid's Inception features (the published FID; needs
              `pip install clean-fid` and its weights download), or any callable
              images in [-1, 1] -> (N, F) features (e.g. ProxyFeatures).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from fastdiff.eval.images import write_pngs


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al., 2017)."""
    import scipy.linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product: regularise as in the reference implementation.
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def extract(extractor, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def fid_per_class(samples: torch.Tensor, sample_labels: torch.Tensor, real: torch.Tensor,
                  real_labels: torch.Tensor, extractor) -> dict:
    """{class: Frechet distance between the samples of that class and the real images of that class}
    in extractor's features (a class-conditional model's per-class FID); NaN where either side
    has fewer than two images."""
    fs, fr = extract(extractor, samples), extract(extractor, real)
    sample_labels, real_labels = sample_labels.cpu(), real_labels.cpu()
    out = {}
    for c in sorted(set(sample_labels.tolist())):
        a, b = fs[sample_labels == c], fr[real_labels == c]
        out[int(c)] = float("nan") if len(a) < 2 or len(b) < 2 else \
            frechet_distance(*feature_stats(a), *feature_stats(b))
    return out


def save_stats(path: str, mu, sigma) -> None:
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"--fid-ref {path}: expected arrays 'mu' and 'sigma', found {list(z.keys())}")
        return z["mu"], z["sigma"]


def _ref_stats(ref, extractor):
    if isinstance(ref, torch.Tensor):
        return feature_stats(extract(extractor, ref))
    if isinstance(ref, str) and ref.endswith(".npz"):
        return load_stats(ref)
    if isinstance(ref, str) and os.path.isdir(ref):
        from fastdiff.data import load_dataset
        ds = load_dataset(ref)
        return feature_stats(extract(extractor, ds.get(torch.arange(len(ds)))))
    raise ValueError(f"--fid-ref must be a folder of images or an .npz of statistics (mu, sigma), got {ref!r}")


def _clean_fid(samples: torch.Tensor, ref) -> float:
    try:
        from cleanfid import fid as cfid
    except ImportError:
        raise RuntimeError("FID with Inception features needs clean-fid: pip install clean-fid "
                           "(its Inception weights are downloaded on first use)") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(samples, tmp)
        if isinstance(ref, str) and os.path.isdir(ref):
            return float(cfid.compute_fid(tmp, ref, mode="clean", device=device, num_workers=0))
        if isinstance(ref, str) and ref.endswith(".npz"):
            mu2, sigma2 = load_stats(ref)
            model = cfid.build_feature_extractor("clean", device)
            feats = cfid.get_folder_features(tmp, model, num_workers=0, device=device, mode="clean")
            mu1, sigma1 = feature_stats(feats)
            return frechet_distance(mu1, sigma1, mu2, sigma2)
        raise ValueError(f"--fid-ref must be a folder of images or an .npz of clean-fid statistics, got {ref!r}")


def fid(samples: torch.Tensor, ref, extractor=None) -> float:
    """FID of samples against ref (see the module docstring)."""
    if extractor is None:
        return _clean_fid(samples, ref)
    mu1, sigma1 = feature_stats(extract(extractor, samples))
    mu2, sigma2 = _ref_stats(ref, extractor)
    return frechet_distance(mu1, sigma1, mu2, sigma2)
