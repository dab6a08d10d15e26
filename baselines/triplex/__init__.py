"""TRIPLEX (Chung et al., CVPR 2024): target, neighbour and global branches fused by cross-attention."""
