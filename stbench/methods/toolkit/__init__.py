"""Helpers that several methods share, in core so that no baseline imports another.

Submodules (import the one you need; this package imports nothing heavy on its own):
- `arrays`: `training_arrays`, the training spots' (features, targets) for closed-form fits
  (probe-ridge, probe-mlp, deepspot, hinge);
- `ema`: `EMA`, an exponential moving average of a network's weights (stem, stmdit);
- `diffusion`: Stem's Gaussian diffusion (schedules, losses, ancestral and DDIM samplers; stem, stmdit);
- `transformer`: HisToGene's masked pre-norm transformer block (histogene, hist2st);
- `whole_slide`: positions, masks and masked validation of whole-slide batches (histogene, hist2st).

Seeded sampling noise is `stbench.methods.sampling`; the SD3 VAE is `stbench.encoders.vae`.
"""
