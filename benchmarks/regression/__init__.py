"""Regression tools: ``python -m benchmarks.regression.same_results [--reference COMMIT]`` runs a
short ``ensattr demo`` with a reference commit's package and with this tree's, then compares the
files they write (plan, results, checkpoint) bit for bit; exit status 1 and the differences
when anything differs."""
