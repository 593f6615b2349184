"""``fastmdl.BudgetLoss``: keep every domain under a cost budget, and pull the
domains onto the same filters."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .cost import METRICS, costs, multidomain_layers

SHARING = (None, "intersection", "union", "jaccard")
_MAX_LEARNED_WEIGHT = 10.0
_MAX_MULTIPLIER = 1000.0


class BudgetLoss(nn.Module):
    r"""Budget and parameter-sharing penalty on a :class:`MultiDomainModel`'s masks.

    With :math:`C_d` the cost (``metric``: "flops" or "params") of domain d's masked
    network, :math:`B_d` the single-domain baseline's, :math:`C_\cup` and
    :math:`C_\cap` the costs of the networks of channels that any / every domain
    keeps (all through straight-through masks, see ``fastmdl/cost.py``):

    .. math::
        r_d = C_d / B_d, \qquad
        L_{budget} = \textstyle\sum_d \lambda_d \max(0,\ r_d - b)

    The multipliers :math:`\lambda_d` start at ``budget_weight`` and, in training
    mode, are multiplied by :math:`\exp(\eta\,(r_d - b))` (:math:`\eta` =
    ``dual_lr``) after each call, within [``budget_weight``, 1000]: exponentiated
    dual ascent on the constraint :math:`r_d \le b`. A domain over budget sees its
    multiplier grow geometrically until the budget wins over whatever the task and
    sharing terms pull for (with an additive step of 0.01 the learnable sharing
    weight, up to 10, held every domain at 92-100% of the FLOPs for a budget of
    0.5 through six epochs; benchmarks/NOTES.md); under budget it decays back.

    and, on the shared layers only (convolutions and linear layers; heads and
    BatchNorms are per domain anyway), with :math:`\bar C = \mathrm{mean}_d C_d`,
    the sharing term is one of

    .. math::
        S_{\cap} = 1 - C_\cap / \bar C, \qquad
        S_{\cup} = C_\cup / \bar C - 1, \qquad
        S_{J} = 1 - C_\cap / C_\cup

    (each 0 when every domain keeps the same filters). The loss is
    :math:`L_{budget} + w S` (``budget_weight`` enters through the multipliers).
    A float ``sharing_weight`` is w; ``"learnable"`` learns w by adding
    :math:`w S - \ln w` (uncertainty weighting), whose minimum over w is at
    :math:`w = 1/S`. w is :math:`10\,\sigma(u)` for a parameter u
    (``sharing_param``, starting at w = 1): bounded by 10 without a clamp, so its
    gradient :math:`(S - 1/w)\,dw/du` never vanishes and w follows S wherever it
    goes; where 1/S > 10 it stays just under the bound. Call it with no arguments;
    add ``sharing_param`` to the optimiser when w is learnable, with its own step
    size (:func:`fastmdl.train`'s ``sharing_lr``): at the task weights' 1e-3, w
    would move 0.1% a step. ``parts()`` gives the last call's terms for logging.
    """

    def __init__(self, model, budget: float, metric: str = "flops",
                 sharing: Optional[str] = None,
                 sharing_weight: Union[str, float] = "learnable", *,
                 budget_weight: float = 1.0, dual_lr: float = 1.0,
                 input_size: Optional[Tuple[int, int, int]] = None):
        super().__init__()
        from .convert import MultiDomainModel

        if not isinstance(model, MultiDomainModel):
            raise TypeError(f"model must be a fastmdl.MultiDomainModel, got {type(model).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1] of the baseline's cost, "
                             f"got {budget!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
        if not model.mask_groups():
            raise ValueError("the model has no prunable filter group: nothing to budget")
        if isinstance(budget_weight, bool) or not isinstance(budget_weight, (int, float)) \
                or budget_weight < 0:
            raise ValueError(f"budget_weight must be a number >= 0, got {budget_weight!r}")
        if isinstance(dual_lr, bool) or not isinstance(dual_lr, (int, float)) or dual_lr < 0:
            raise ValueError(f"dual_lr must be a number >= 0, got {dual_lr!r}")
        self.budget, self.metric, self.sharing = float(budget), metric, sharing
        self.budget_weight, self.dual_lr = float(budget_weight), float(dual_lr)
        self.register_buffer("multipliers", torch.full((model.num_domains,), float(budget_weight)))
        self.input_size = input_size
        self._model = [model]  # not a submodule: its parameters are not ours
        if sharing_weight == "learnable":
            # w = 10 sigmoid(u) = 1 at u = -ln 9.
            self.sharing_param = nn.Parameter(torch.tensor(-math.log(_MAX_LEARNED_WEIGHT - 1)))
            self.fixed_weight = None
        elif isinstance(sharing_weight, (int, float)) and not isinstance(sharing_weight, bool) \
                and sharing_weight >= 0:
            self.sharing_param = None
            self.fixed_weight = float(sharing_weight)
        else:
            raise ValueError(f"sharing_weight must be 'learnable' or a number >= 0, "
                             f"got {sharing_weight!r}")
        self._parts: Dict[str, object] = {}

    def sharing_weight(self) -> torch.Tensor:
        """The current weight w of the sharing term."""
        if self.sharing_param is None:
            return torch.tensor(self.fixed_weight)
        return _MAX_LEARNED_WEIGHT * torch.sigmoid(self.sharing_param)

    def forward(self) -> torch.Tensor:
        model = self._model[0]
        layers = multidomain_layers(model, self.input_size)
        c = costs(layers, self.metric)
        # Sharing compares the shared layers only: heads and BatchNorms are per domain.
        shared = costs([x for x in layers if x.kind in ("conv", "linear")], self.metric)
        ratio = c.per_domain / c.baseline
        over = ratio - self.budget
        lam = self.multipliers.to(ratio.device).clone()
        budget_term = (lam * torch.relu(over)).sum()
        total = budget_term
        if self.training and torch.is_grad_enabled() and self.dual_lr > 0:
            with torch.no_grad():
                self.multipliers.copy_((lam * torch.exp(self.dual_lr * over.detach())).clamp(
                    min=self.budget_weight, max=_MAX_MULTIPLIER))
        sharing = torch.zeros((), device=total.device)
        mean = shared.per_domain.mean().clamp(min=1e-12)
        if self.sharing == "intersection":
            sharing = 1 - shared.intersection / mean
        elif self.sharing == "union":
            sharing = shared.union / mean - 1
        elif self.sharing == "jaccard":
            sharing = 1 - shared.intersection / shared.union.clamp(min=1e-12)
        w = self.sharing_weight().to(total.device)
        if self.sharing is not None:
            total = total + w * sharing
            if self.sharing_param is not None:
                total = total - torch.log(w)
        base = c.baseline.mean()
        self._parts = {
            "cost": ratio.detach().cpu().tolist(),
            "union": float((c.union / base).detach()),
            "intersection": float((c.intersection / base).detach()),
            "multipliers": lam.detach().cpu().tolist(),
            "budget_term": float(budget_term.detach()), "sharing": float(sharing.detach()),
            "sharing_weight": float(w.detach()), "total": float(total.detach()),
        }
        return total

    def parts(self) -> Dict[str, object]:
        """The last call's terms: per-domain cost as a fraction of the baseline
        ("cost"), the budget multipliers, union and intersection cost (fractions of
        the mean baseline), the budget term, the sharing term, its weight and the total."""
        return dict(self._parts)

    def extra_repr(self) -> str:
        return (f"budget={self.budget}, metric={self.metric!r}, sharing={self.sharing!r}, "
                f"budget_weight={self.budget_weight}, dual_lr={self.dual_lr}")
