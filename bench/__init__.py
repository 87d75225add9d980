"""The benchmark suite and its members; run them as modules from the repository root (see bench/README.md).

``python -m bench.suite`` runs every member, one process each; ``python -m bench.<member> --help`` runs one.
:mod:`bench.common` holds what the members share in reporting (machine, summaries, result files),
:mod:`bench.inputs` the inputs several of them generate (random-weight models, CLIP-like vectors).
"""
