"""FLOPs cost model of the real architectures RALU runs on (docs/method.md §6).

Two conventions are kept side by side in :class:`~.pricing.Flops`:

* ``total``: everything ``torch.utils.flop_counter.FlopCounterMode`` counts (linear and conv
  layers plus attention matmuls);
* ``linear``: linear and conv layers only, the paper's convention (attention matmuls,
  ``aten.bmm``/``aten.baddbmm`` and the scaled-dot-product-attention kernels, excluded).

The package has three jobs, one module each:

* :mod:`.pricing`: prices images from the shipped ``flops_table.json`` (cheap; what the
  layout search calls thousands of times; never imports torch);
* :mod:`.counting`: counts the registry's architectures on the meta device and fits the
  table's exact polynomials (``python -m ralu.calibrate.flops --write``);
* :mod:`.report`: renders ``reports/flops.md`` (``python -m ralu.calibrate.flops --report
  reports/flops.md``); :mod:`.cli` is the command line.

Import from those modules.  The names below are re-exported only because ``calibrate/bench``
still imports them from the package; they go once it imports the modules.
"""

from ralu.calibrate.presets import PRESETS as _PRESETS
from ralu.runtime.models import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, VAE_16CH

from .counting import count_flops, fit_quadratic
from .pricing import ZERO, Flops, evaluate_quadratic, flops_speedup, ralu_breakdown, transformer_forward_flops

#: The presets whose FLOPs speed-up the paper states (``.speedup``), for calibrate/bench.
PAPER_LAYOUTS = tuple(p for p in _PRESETS if p.speedup is not None)

__all__ = [
    "FLUX_DEV_TRANSFORMER",
    "PAPER_LAYOUTS",
    "SD3_MEDIUM_TRANSFORMER",
    "VAE_16CH",
    "ZERO",
    "Flops",
    "count_flops",
    "evaluate_quadratic",
    "fit_quadratic",
    "flops_speedup",
    "ralu_breakdown",
    "transformer_forward_flops",
]
