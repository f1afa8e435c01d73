"""``ralu-bench quality``: image quality of RALU against its peers at matched cost, on the
offline quality testbeds: v2 by default (64 px latent-space FLUX and SD3 generators,
fine-detail metrics with bootstrap intervals and paired verdicts; code in the v2 subpackage,
docs/testbed-v2.md §5), v1 with ``--testbed v1``.

The rest of this docstring describes v1 (:mod:`ralu.calibrate.testbed`), whose modules v2
reuses, parameterised by architecture.

Everything runs offline on the testbed: a small ``FluxTransformer2DModel`` in pixel space
(32x32 RGB, an identity "VAE", 256 image tokens at full size, 64 at half size; its
scheduler's dynamic shift gives h0 = exp(1.15) = 3.158 at 32 px, like FLUX.1-dev at
1024 px), served by a real ``diffusers.FluxPipeline``, and a small CNN that reads the
conditioning (shape, colour, position) back from an image.

Metrics, per seed (one image per label, same labels and initial noise for every method):

* **PSNR / SSIM** against the 50-step baseline sample from the same initial noise and
  labels (fidelity to the full-step sampler), on [0, 1] RGB.  PSNR is capped at
  :data:`.config.PSNR_CAP` dB (identical images), so that every number is finite.  SSIM: gaussian
  window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, per channel, valid positions only.
* **FD**: Frechet distance between the classifier's penultimate features of the generated
  images and of real procedural images (same, balanced label distribution): an FID
  analogue.  Small sets bias it upwards; the report gives the real-vs-real value at the same
  sample size as the floor.
* **accuracy**: fraction of images whose shape, colour and position the classifier reads
  back as conditioned (a GenEval analogue).
* **edge artifacts**: the 2x2 *blocking index* (:func:`.metrics.blocking_index`), grid-aligned
  discontinuities of the kind nearest upsampling leaves, weighted by edge energy.

Methods (exact definitions in :func:`.methods.plan_methods` and the report), at every budget:
the base model with fewer steps; Bottleneck Sampling (high-low-high with re-noising and
larger shifts); naive two-stage upsampling (no re-noising); RALU with the published preset
and ``paper_compat=True``; RALU with our calibration (exact noise, global optimum at the
testbed's h0); RALU with the layout of our outer search; plus one row per ``--schedule``.
Peers' step counts are chosen so that their total FLOPs match the RALU preset's as closely
as integers allow; every row reports its own measured FLOPs speed-up.

Cost: the testbed transformer's forward is counted with
:func:`ralu.calibrate.flops.counting.count_flops` on the meta device at every token count a forward
really sees (recorded by a hook on the transformer), plus the 3 text tokens.  The testbed's
"VAE" is the identity, so RALU's edge-detection decode and the final decode cost nothing
here; text encoding is a table lookup (no cost).

Run ``ralu-bench quality`` (about 20-30 min on 2 CPU cores) or ``--quick`` (CI, < 1 min).

Modules: :mod:`.args` (the command line, cheap), :mod:`.config` (presets, metrics, the
configuration), :mod:`.metrics`, :mod:`.cost` (FLOPs), :mod:`.schedules` (the RALU rows'
schedules), :mod:`.methods` (every row, matched cost), :mod:`.sampler` (images of every
method), :mod:`.run` (the benchmark, sweep, winners and files), :mod:`.schema` (the typed
report), :mod:`.report` (its Markdown), :mod:`.figures`.
"""
