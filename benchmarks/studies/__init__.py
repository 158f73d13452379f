"""Studies of answer quality, not of speed: which training mode attributes best
(``python -m benchmarks.studies.study_training_modes``), which combination of gradient
features (``study_gradient_combinations``), what projection costs against the full kernel
(``study_projection``), each a command of its own; and the trust measurements of issue 12
(``benchmark_trust_*``: copies of planted canaries, group audits against retraining,
calibration of the noise floor and false attribution), each ``run(quick, device) -> Suite``
like a timing benchmark but run only when named: ``python -m benchmarks --only trust`` (or
``--only trust_copies``...). They train models for minutes to hours; trained models are kept
under ``$ENSATTR_TRUST_DIR`` (default ``out/trust``) for reruns."""
