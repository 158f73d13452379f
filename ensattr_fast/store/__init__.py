"""The HDF5 result store: one file per run, readable with nothing but h5py (the layout is the
contract in docs/results-format.md). With :mod:`ensattr_fast.data.disk`, the only part of the
package that opens HDF5 files.

- :mod:`.writer`: writing results and plan files; code hashes, versions, one reader check;
- :mod:`.streams`: datasets written block by block with done flags, recovery after a kill;
- :mod:`.streaming`: scoring every unit and streaming the matrices, stitching rank parts;
- :mod:`.reads`: what the steps read from the files;
- :mod:`.results`: :func:`open_results`, the lazy reader users load results with.
"""

from ..errors import StoreError
from .reads import count_samples, counterfactuals_written_by, read_dataset, read_plan, read_sampler, read_samples, read_unit_of
from .memorization import read_memorization, write_memorization
from .results import InfluenceView, Results, open_results
from .streaming import part_path, stitch_parts, stream_influence, stream_scores
from .recovery import recover_after_kill, unreadable
from .streams import InfluenceStream, SampleStream
from .writer import ResultsWriter, cached_statistic, check_code, code_hash, file_hash, read_hdf5, versions

__all__ = ["StoreError", "ResultsWriter", "open_results", "Results", "InfluenceView", "InfluenceStream",
           "SampleStream", "recover_after_kill", "stream_influence", "stream_scores", "stitch_parts",
           "part_path", "counterfactuals_written_by", "read_plan", "read_samples", "read_unit_of", "count_samples", "read_sampler",
           "read_dataset", "unreadable", "cached_statistic", "check_code", "code_hash", "file_hash", "read_hdf5", "versions",
           "write_memorization", "read_memorization"]
