"""STFlow: whole-slide flow matching from a ZINB prior with a k-NN spatial transformer."""
