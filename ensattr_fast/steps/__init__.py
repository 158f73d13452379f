"""The steps of an audit, one module per command: each reads what the previous one wrote (a
plan file, a checkpoint, a results file), takes typed arguments, and reads and writes files
only through :mod:`ensattr_fast.store`. The command line calls them; so can a user's script.

plan -> train -> sample -> attribute / ablate -> metrics, lds, report; ``demo`` chains them.
"""

from ._floors import summary as significance_summary
from .ablate import Floor, ablate_step
from .audit import audit_step
from .attribute import attribute_step, exact_check, read_groups
from .demo import run_demo
from .lds import lds_step
from .memorization import memorization_step, summary as memorization_summary
from .metrics import metrics_step
from .plan import make_plan
from .report import report_step
from .sample import sample_step
from .train import train

__all__ = ["make_plan", "train", "sample_step", "ablate_step", "Floor", "audit_step", "significance_summary", "attribute_step", "exact_check", "read_groups",
           "metrics_step", "lds_step", "report_step", "run_demo", "memorization_step", "memorization_summary"]
