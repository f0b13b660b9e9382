"""fastdiff: fast, exact Stable Target Field and weighted-ELBO diffusion training."""
from fastdiff.ops import available_backends, stf_target, stf_weights, weighted_mse
from fastdiff.distributed import stf_target_sharded
from fastdiff.sampling import sample

__version__ = "0.1.0"

__all__ = ["available_backends", "stf_target", "stf_weights", "weighted_mse", "sample", "stf_target_sharded"]
