"""Single-cell foundation-model backbones (CellFM, scGPT) shared by methods that wrap a frozen sc-FM.

The contract (Backbone / BackboneBlock) is in base.py; build_backbone(kind, size, checkpoint) in
registry.py is the one way methods obtain a backbone.
"""

from baselines._scfm.base import Backbone, BackboneBlock
from baselines._scfm.registry import BUILDERS, build_backbone, register_backbone

__all__ = ["BUILDERS", "Backbone", "BackboneBlock", "build_backbone", "register_backbone"]
