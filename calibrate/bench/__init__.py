"""``ralu.calibrate.bench``: measurements of the runtime, behind the ``ralu-bench`` command.

* ``ralu-bench speed`` (:mod:`ralu.calibrate.bench.speed`): wall-clock speed-up of the RALU
  pipelines against plain diffusers pipelines, the runtime's own overhead itemised, peak
  memory, next to the FLOPs speed-ups; writes ``reports/speed.md`` and ``reports/speed.json``.

Subcommands are registered in :mod:`ralu.calibrate.bench.cli`.  Importing this package is
cheap (no torch, no diffusers).
"""
