"""fastmdl: multi-domain convolutional networks pruned to a budget and served in one
pass through fused mixed-domain kernels.

The hot path is the op ``fastmdl.ops.domain_conv2d`` (``torch.ops.fastmdl.domain_conv2d``).
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (declares torch.ops.fastmdl.domain_conv2d)
from .backends import cpp as _cpp  # noqa: E402

if _cpp.status()[0]:
    from . import _ops as _ops_module

    _ops_module.register_cpp_fake()

from . import winograd  # noqa: E402,F401  (registers the Winograd ops' fake implementations)
from .layers import BatchNorm2d, Conv2d, DomainHeads  # noqa: E402
from .conv_heads import ConvHeads  # noqa: E402
from .masks import MaskGroup  # noqa: E402
from .convert import MultiDomainModel, convert  # noqa: E402
from .cost import CostReport, cost_report  # noqa: E402
from .budget import BudgetLoss  # noqa: E402
from .pruned import PrunedModel  # noqa: E402
from .prune import prune  # noqa: E402
from .pagcp import pagcp  # noqa: E402
from .serialize import load, save  # noqa: E402
from .train import evaluate, fill_budget, recalibrate_bn, train  # noqa: E402
from .finetune import finetune  # noqa: E402
from . import basis  # noqa: E402
from .metrics import decathlon_score  # noqa: E402
from . import data  # noqa: E402

__all__ = ["ops", "__version__", "Conv2d", "BatchNorm2d", "DomainHeads", "ConvHeads",
           "MaskGroup",
           "MultiDomainModel", "convert", "BudgetLoss", "cost_report", "CostReport", "PrunedModel",
           "prune", "pagcp",
           "save", "load",
           "train", "finetune", "evaluate", "fill_budget", "recalibrate_bn", "decathlon_score",
           "data", "basis"]
