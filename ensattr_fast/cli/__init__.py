"""``ensattr``: the command line, a thin shell over :class:`ensattr_fast.Audit`. The parser is
generated from the steps' options dataclasses (:mod:`.parser`), ``--config`` files read into
the same dataclasses (:mod:`ensattr_fast.steps.config_file`); :mod:`.main` runs one step."""
