"""Data layer: slide model, readers, catalog, gene panels, normalisation, splits, patches."""

from stbench.data.image import SlideImage
from stbench.data.slide import Slide

__all__ = ["Slide", "SlideImage"]
