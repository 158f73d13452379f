"""The HDF5 result store: one file per run, readable with nothing but h5py (the layout is the
contract in docs/results-format.md). With :mod:`ensattr_fast.data.disk`, the only part of the
package that opens HDF5 files.

- :mod:`.hdf5`: opening files to read, one error for a damaged file, code and file hashes;
- :mod:`.writer`: writing results and plan files, statistics kept for resumes;
- :mod:`.streams`: datasets written block by block with done flags (influence matrices, samples);
- :mod:`.recovery`: a file whose writer was killed, made sound again;
- :mod:`.parts`: the rank parts of a distributed attribution, stitched into one file;
- :mod:`.reads`: what the steps read from the files;
- :mod:`.results`: :func:`open_results`, the lazy reader users load results with.
"""

from ..errors import StoreError
from .hdf5 import (check_code, check_results, code_hash, damaged, dump_json, file_hash, open_for_reading, parse_json,
                   read_hdf5, versions)
from .memorization import read_memorization, write_memorization
from .parts import part_path, stitch_parts
from .reads import (count_samples, counterfactuals_request, counterfactuals_written_by, read_conditions, read_dataset,
                    read_labels, read_plan, read_sampler, read_samples, read_unit_of)
from .recovery import recover_after_kill, unreadable
from .results import InfluenceView, Results, open_results
from .streams import InfluenceStream, SampleStream, influence_streams, write_scores
from .writer import ResultsWriter, cached_statistic

__all__ = ["StoreError", "ResultsWriter", "open_results", "Results", "InfluenceView", "InfluenceStream",
           "SampleStream", "influence_streams", "write_scores", "recover_after_kill", "stitch_parts", "part_path",
           "counterfactuals_written_by", "counterfactuals_request", "read_plan", "read_samples", "read_labels",
           "read_conditions", "read_unit_of",
           "count_samples", "read_sampler", "read_dataset", "unreadable", "cached_statistic", "check_code",
           "code_hash", "file_hash", "read_hdf5", "open_for_reading", "versions", "check_results", "parse_json",
           "dump_json", "damaged", "write_memorization", "read_memorization"]
