"""Fused ops: argument checks, torch.library registration, backend dispatch."""
from fastdiff.ops._dispatch import available_backends
from fastdiff.ops.stf import stf_target, stf_weights
from fastdiff.ops.weighted_mse import weighted_mse

__all__ = ["available_backends", "stf_target", "stf_weights", "weighted_mse"]
