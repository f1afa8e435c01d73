"""What ``reports/speed.json`` holds: the report's typed rows and the targets they are judged by."""

from __future__ import annotations

REPORT_NAME = "speed"
#: Targets of the issue: runtime overhead per image, wall-clock vs total-FLOPs speed-up.
OVERHEAD_TARGET = 0.03
WALL_FLOPS_TOLERANCE = 0.10

#: The runtime's overhead sections, as the report names them.
OVERHEAD_LABELS = {
    "edge_decode": "edge decode (Tweedie, VAE)",
    "edge_select": "Canny + top-k",
    "noise": "noise",
    "gather_scatter": "gather/scatter",
    "positions": "positions",
}
