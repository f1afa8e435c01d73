"""``ralu_lab``: the lab beside the ``ralu`` product (docs/architecture.md).

``ralu_lab.bench`` (``ralu-bench``: speed, quality, step caches, the experiments behind
``reports/``) and ``ralu_lab.testbed`` (testbed v2).  It imports the product; the product
never imports it and reaches it only through the entry points of ``lab/pyproject.toml``.
"""
