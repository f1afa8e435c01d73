"""``ralu-bench quality``: image quality of RALU against its peers at matched cost, on the
offline quality testbed v2 (64 px latent-space FLUX and SD3 generators, fine-detail metrics
with bootstrap intervals and paired verdicts; docs/testbed-v2.md §5).

Methods, at every budget (the published presets' speed-ups): the base model with fewer
steps; for FLUX, Bottleneck Sampling (high-low-high with re-noising and larger shifts) and
naive two-stage upsampling (no re-noising); RALU with the published preset, with our
calibration of its layout and with the layout of our outer search; step caches on RALU and
on the plain pipeline; plus one row per ``--schedule``.  Peers' step counts are chosen so
that their FLOPs match the RALU preset's as closely as integers allow; every row reports
its own measured FLOPs speed-up.

The code of testbed v2's harness is in the :mod:`.v2` subpackage.  The modules here are
what its rows are made of: :mod:`.args` (the command line, cheap), :mod:`.config` (the
published FLUX presets, the peers' defaults, labels), :mod:`.cost` (a FLUX transformer's
FLOPs on the meta device), :mod:`.schedules` (the RALU rows' schedules), :mod:`.methods`
(how each row samples, matched cost), :mod:`.sampler` (the peers' staged Euler sampler) and
:mod:`.run` (the runner ``ralu-bench`` imports).
"""
