"""fastdiff.diffusion: processes, parameterizations, weightings, noise densities,
DSM/STF objectives and the continuous-time ELBO, all in VE form."""
from fastdiff.diffusion.density import DENSITIES, AdaptiveDensity, Density, get_density, histogram
from fastdiff.diffusion.gmm import GaussianMixture
from fastdiff.diffusion.likelihood import elbo_bpd
from fastdiff.diffusion.objectives import OBJECTIVES, Objective, make_objective
from fastdiff.diffusion.parameterization import (PARAMETERIZATIONS, PREDICTIONS, Parameterization, convert,
                                                 error_scale, get_parameterization)
from fastdiff.diffusion.processes import (PROCESSES, CosineProcess, EDMProcess, Process, VEProcess, VPProcess,
                                          get_process)
from fastdiff.diffusion.weighting import WEIGHTINGS, LearnedWeighting, Weighting, convert_weighting, get_weighting

__all__ = [
    "DENSITIES", "AdaptiveDensity", "Density", "get_density", "histogram", "GaussianMixture", "elbo_bpd", "OBJECTIVES",
    "Objective", "make_objective", "PARAMETERIZATIONS", "PREDICTIONS", "Parameterization", "convert",
    "error_scale", "get_parameterization", "PROCESSES", "CosineProcess", "EDMProcess", "Process", "VEProcess",
    "VPProcess", "get_process", "WEIGHTINGS", "LearnedWeighting", "Weighting", "convert_weighting",
    "get_weighting",
]
