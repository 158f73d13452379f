"""Evaluation: how good the answers are. Validity metrics of counterfactuals and scores
(:mod:`.metrics`), the linear datamodeling score against retrained models (:mod:`.lds`), and a
digit classifier that judges what an ensemble draws (:mod:`.judge`), and how far an effect stands
above the noise floor of phantom ablations (:mod:`.significance`)."""

from .judge import DigitJudge, train_judge
from .lds import lds_table, reference_subsets
from .metrics import agreement, counterfactual_radius, lds, mean_interval
from .significance import benjamini_hochberg, empirical_pvalues, significance

__all__ = ["DigitJudge", "train_judge", "lds_table", "reference_subsets", "agreement",
           "counterfactual_radius", "lds", "mean_interval",
           "benjamini_hochberg", "empirical_pvalues", "significance"]
