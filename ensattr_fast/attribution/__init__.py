"""Attribution: a score for every unit on every sample or query, cheaper than exact ablation
and checked against it.

- :mod:`.first_order`: the Jacobian of the sample in the member weights (exact and direct);
- :mod:`.loss`: each member's diffusion loss on a query, contrasted over the code;
- :mod:`.gradients`: TRAK and D-TRAK features of every member and their combinations;
- :mod:`.baselines`: pixel nearest neighbours;
- :mod:`.blocks`: every unit scored against every row, block by block, into block sinks;
- :mod:`.full_kernel`: the kernel of the full (unprojected) gradients, for small training sets;
- :mod:`.methods`: the registry of methods and how each statistic is computed.
"""

from ..codes import group_code
from .baselines import nearest_units, pixel_similarity
from .first_order import FirstOrderGrams, first_order_grams
from .gradients import FeatureSpec, combine, dataset_features, gradient_features, member_scores
from .loss import member_losses
from .methods import DEFAULT_METHODS, METHODS, Method, get_method, parse_methods

__all__ = ["FirstOrderGrams", "first_order_grams", "member_losses", "group_code", "FeatureSpec",
           "gradient_features", "dataset_features", "member_scores", "combine", "nearest_units",
           "pixel_similarity", "Method", "METHODS", "DEFAULT_METHODS", "get_method", "parse_methods"]
