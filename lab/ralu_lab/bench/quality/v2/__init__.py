"""``ralu-bench quality``: RALU against its peers on testbed v2
(:mod:`ralu_lab.testbed.v2`: 64 px scenes in a factor-2 latent space, a FLUX and an SD3
generator in their real diffusers pipelines, a classifier that reads fine attributes).

Modules: :mod:`.plan` (configuration and every row per architecture and budget),
:mod:`.cost` (transformer FLOPs at the token counts really run, the decoder's FLOPs, executed
linear FLOPs of cached runs), :mod:`.sampler` (images of every row, kept in a work folder so
a run resumes), :mod:`.stats` (metrics pooled over seeds with bootstrap intervals, paired
verdicts, the regime check), :mod:`.schema` (the typed JSON), :mod:`.report` (its Markdown),
:mod:`.figures`, :mod:`.run` (the benchmark).  The shared machinery (the peers' definitions,
the schedules, the staged Euler sampler) is in :mod:`ralu_lab.bench.quality`,
parameterised by architecture.
"""
