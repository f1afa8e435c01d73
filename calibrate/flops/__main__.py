"""Run the FLOPs command line: ``python -m ralu.calibrate.flops --help``."""

from .cli import main

raise SystemExit(main())
