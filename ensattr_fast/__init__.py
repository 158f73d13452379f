"""ensattr_fast: training data attribution for diffusion models by encoded ensembles.

M diffusion models (members) each train on a planned half of the training units; the members
that never saw a unit form the ensemble that has exactly forgotten it. See README.md.
"""

__version__ = "0.1.0"

from .ops import CodeScores, build_info, code_scores, ensemble_step, masked_member_mse
from .results import open_results

__all__ = ["CodeScores", "build_info", "code_scores", "ensemble_step", "masked_member_mse", "open_results"]
