"""The report: each sample beside its exact counterfactuals and the training images they
removed, as a PNG (:mod:`.figures`) and as one self-contained HTML page (:mod:`.html`)."""
