"""stbench: one benchmark for histology-to-spatial-expression methods.

Same slides, splits, gene panels and metrics for every method, with every convention declared.
"""

__version__ = "0.1.0"
