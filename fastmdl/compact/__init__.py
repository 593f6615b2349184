"""The compact layout: how a :class:`fastmdl.PrunedModel` runs a mixed batch.

The batch is grouped by domain once on entry (``segments.py``). Between layers
each domain's samples hold only that domain's channels (``support.py``). Every
convolution and linear layer runs with weights packed per domain at prune or
load time, BatchNorm folded in, the residual add and ReLU fused after it
(``steps.py``). The result goes back to the caller's order once on exit.
``plan.build`` turns the pruned network's graph into these steps.
"""

from .plan import PACK_LIMIT, CompactPlan, Unsupported, build
from .segments import Segments
from .support import Support

__all__ = ["CompactPlan", "Unsupported", "build", "Segments", "Support", "PACK_LIMIT"]
