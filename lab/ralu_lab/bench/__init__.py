"""``ralu_lab.bench``: measurements of the runtime, behind the ``ralu-bench`` command.

* ``ralu-bench speed`` (:mod:`ralu_lab.bench.speed`): wall-clock speed-up of the RALU
  pipelines against plain diffusers pipelines, the runtime's own overhead itemised, peak
  memory, next to the FLOPs speed-ups; writes ``reports/speed.md`` and ``reports/speed.json``.
* ``ralu-bench quality`` (:mod:`ralu_lab.bench.quality`): image quality of RALU against
  its peers at matched FLOPs on the offline testbed; writes ``reports/quality.md``,
  ``reports/quality.json`` and ``reports/quality/``.

Subcommands are registered in :mod:`ralu_lab.bench.cli`.  Importing this package, the
subcommand packages and their ``args`` modules is cheap (no torch, no diffusers); the
modules that run a benchmark import what they need at the top and are loaded only when it runs.
Shared formats, tables and file writing: :mod:`ralu_lab.bench.common`.
"""
