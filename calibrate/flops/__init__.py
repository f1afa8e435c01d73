"""FLOPs cost model of the real architectures RALU runs on (docs/method.md §6).

Two conventions are kept side by side in :class:`~.pricing.Flops`:

* ``total``: everything ``torch.utils.flop_counter.FlopCounterMode`` counts (linear and conv
  layers plus attention matmuls);
* ``linear``: linear and conv layers only, the paper's convention (attention matmuls,
  ``aten.bmm``/``aten.baddbmm`` and the scaled-dot-product-attention kernels, excluded).

The package has three jobs, one module each; import from them:

* :mod:`.pricing`: prices images from the shipped ``flops_table.json`` (cheap; what the
  layout search calls thousands of times; never imports torch);
* :mod:`.counting`: counts the registry's architectures on the meta device and fits the
  table's exact polynomials (``python -m ralu.calibrate.flops --write``);
* :mod:`.report`: renders ``reports/flops.md`` (``python -m ralu.calibrate.flops --report
  reports/flops.md``); :mod:`.cli` is the command line.
"""
