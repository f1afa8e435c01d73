"""``ralu-bench cache``: what diffusers' step caches save and change in a RALU run, on the
offline testbed v2's generators.

A cache skips work inside the forwards it runs, so the FLOPs a schedule file states (every
forward in full) overstate a cached run's cost.  ``executed_linear_flops`` counts the
multiply-adds of the Linear layers that really execute (forward hooks on every ``nn.Linear``
of the transformer: a skipped block's layers are not called), the linear-FLOPs convention of
the schedule files.  Each row of the report gives, for one cache on one schedule: the
fraction of the uncached run's linear FLOPs executed, and how far the final latents move
from the uncached ones (RMS difference over RMS of the uncached latents, same noise).
Wall-clock time is not reported: on the tiny testbed models hook overhead dominates it.
"""
