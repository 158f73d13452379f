"""ensattr_fast: training data attribution for diffusion models by encoded ensembles.

M diffusion models (members) each train on a planned half of the training units; the members
that never saw a unit form the ensemble that has exactly forgotten it. Sampling the full and
the ablated ensembles from the same noise gives exact counterfactuals; first-order, loss-based
and gradient scores rank every unit cheaply. The method: docs/method.md; the layout of the
package: docs/architecture.md.

>>> import ensattr_fast as ef
>>> checkpoint = ef.Checkpoint.load("demo/ensemble.pt")
>>> ensemble, schedule = checkpoint.build(), checkpoint.schedule
>>> x = ef.sample(ensemble, schedule, ef.Sampler("ddim", steps=50), seeds=[0, 1])
>>> cf = ef.ablate(ensemble, schedule, ef.Sampler("ddim", steps=50), checkpoint.code, [0, 1], [[17]])

The steps of the command line (plan, train, sample, attribute, ...) are
:mod:`ensattr_fast.steps`; codes and designs :mod:`ensattr_fast.codes`; the HDF5 store
:mod:`ensattr_fast.store`.
"""

from ._version import __version__
from .attribution import first_order_grams, member_losses
from .checkpoint import Checkpoint
from .data import Dataset, load_dataset, load_digits
from .errors import EnsattrError
from .members import MemberOptions, build_members
from .ops import build_info, code_scores, ensemble_step, masked_member_mse
from .sampling import ablate, sample
from .schedules import NoiseSchedule, Sampler
from .store import open_results
from .training import TrainConfig, Trainer

__all__ = ["__version__", "Checkpoint", "Dataset", "load_digits", "load_dataset", "TrainConfig", "Trainer",
           "MemberOptions", "build_members", "NoiseSchedule", "Sampler", "sample", "ablate",
           "first_order_grams", "member_losses", "code_scores", "ensemble_step", "masked_member_mse",
           "open_results", "build_info", "EnsattrError"]
