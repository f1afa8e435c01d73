"""ralu_lab.testbed: the quality testbed, which needs no real weights.

The testbed is v2 (:mod:`ralu_lab.testbed.v2`: 64 px scenes in a factor-2 latent
space, a FLUX and an SD3 generator in their real diffusers pipelines, a classifier that
reads fine attributes; docs/testbed-v2.md).  The first testbed (v1: 32 px, pixel space,
FLUX only) is retired; its reports are archived under ``reports/experiments/archive/``.
The trained weights, with the commands that produced them, are repository data in
``lab/testbed-weights/v2/``, not part of the installed package
(:mod:`ralu_lab.testbed.v2.location` says how they are found).
"""
