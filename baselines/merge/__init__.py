"""MERGE (Ganguly et al., CVPR 2025): graph attention over a multi-faceted hierarchical spot graph."""
