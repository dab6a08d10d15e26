"""Built-in readers, one module per public format; importing this package registers them."""

from stbench.data.readers.base import READERS, SlideReader, get_reader, register_reader

__all__ = ["READERS", "SlideReader", "get_reader", "register_reader"]

# Each import registers its reader. Keep alphabetical; a new format = a new module + a line here.
from stbench.data.readers import (  # noqa: E402,F401
    anndata_reader,
    crunchdao,
    cscc,
    he_tiles,
    her2st,
    hest,
    synthetic,
    visium,
    xenium,
)
