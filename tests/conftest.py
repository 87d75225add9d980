"""Test options shared by the whole suite.

Markers: ``slow`` marks the tests that dominate the suite's time (full-size parity checkpoints, end-to-end demo
training, schema fuzzing, the benchmark smoke run). ``make test`` runs everything; ``make check`` deselects them
(``-m "not slow"``) for a fast loop.
"""
