"""Stem (Zhu et al., ICLR 2025): conditional diffusion over gene-expression tokens given histology."""
