"""HINGE: a frozen single-cell foundation model (baselines/_scfm) made histology-conditioned by
SoftAdaLN and trained as a masked diffusion over expression (method card: README.md)."""
