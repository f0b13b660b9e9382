"""Evaluation: FID (clean-fid's Inception features, or any feature extractor) and a fast proxy FID.

Command-line studies (not imported here, to keep this package light):
`python -m fastdiff.eval.variance` (the STF paper's target variances, exact over a data set) and
`python -m fastdiff.eval.study` (DSM vs STF vs weightings/densities trained alike); see docs/results.md."""
from fastdiff.eval.fid import extract, feature_stats, fid, fid_per_class, frechet_distance, load_stats, save_stats
from fastdiff.eval.images import save_grid, write_pngs
from fastdiff.eval.proxy import ProxyFeatures, digits_labels, train_proxy

__all__ = ["extract", "feature_stats", "fid", "fid_per_class", "frechet_distance", "load_stats", "save_stats", "write_pngs", "save_grid",
           "ProxyFeatures", "digits_labels", "train_proxy"]
