"""The INT8 judge: one rule for whether an INT8 model meets the accuracy budget, and one for which of
several is best, used by every INT8 artefact of every backend (ONNX Runtime's budget loop, QAT's
CPU model, a backend's own accuracy-aware quantizer, the recommendation between them).

What it judges is a Fidelity (rise_edge.export.fidelity): the model against FP32 on the judge images,
the source domains' validation images (never trained on, never calibrated on, never used to select
a QAT step), never the target domain.

The rule, and why:
- met: the one-sided 95 % upper bound of the paired accuracy drop over the judge images of all source
  domains together is within the budget, and no source domain's point drop exceeds it (a domain
  whose one image is worth more than the budget is judged only in the pooled figure: there a single
  flip would decide). A bound, not a
  point estimate, because a point estimate within the budget says nothing when a handful of images
  decide it. Pooled over domains because one domain's validation split is too small to bound a
  1-point budget at all (PACS's official splits hold 167 to 393 validation images per domain: with no
  disagreement at all, 167 images bound the drop by 1.6 points); the per-domain point check keeps
  one domain from hiding behind the others.
- When the judge images are too few for any model to meet the budget that way (with no disagreement
  at all the bound would exceed it: the demo's 3 x 84 validation images bound a 1-point budget at
  1.06), the point drops decide instead, and the verdict says so (`decided_by`).
- best: met before not met; then the smaller pooled upper bound (more agreement, fewer flips to
  wrong; a lucky negative point drop does not win); then the higher agreement with FP32; then the
  fewer layers kept in higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rise_edge.export.fidelity import Fidelity, paired_drop_bound

RULE = ("met when the one-sided 95 % upper bound (Tango's score interval) of the paired accuracy drop "
        "against FP32, over the judge images of all source domains together, is within the budget "
        "and no source domain's point drop exceeds it (domains where one image is worth more than the "
        "budget count in the pooled figure only; the pooled point drop stands in for the bound when "
        "too few images could ever meet it); best: met first, then the smallest such upper "
        "bound, then the highest agreement with FP32, then the fewest layers in higher precision")
JUDGE_IMAGES = ("source-domain validation images (never trained on, calibrated on or used to select "
                "a QAT step); the target domain plays no part")

@dataclass(frozen=True)
class Verdict:
    """Whether one INT8 model meets the budget, and the numbers that decided it."""

    budget: float
    met: bool
    upper95: float              # pooled one-sided 95 % upper bound of the drop, points
    drop: float                 # pooled point drop, points
    worst_domain_drop: float    # largest per-domain point drop, points
    images: int
    certifiable: bool           # could any model meet the budget on this many images?
    agreement: float = 100.0    # pooled top-1 agreement with FP32, % of the judge images
    worst_domain_agreement: float = 100.0  # the lowest source domain's agreement, %

    def to_record(self) -> dict[str, Any]:
        return {"budget_points": self.budget, "met": self.met, "rule": RULE,
                "judged_on": JUDGE_IMAGES, "images": self.images,
                "drop_points": self.drop, "drop_upper95": self.upper95,
                "worst_domain_drop_points": self.worst_domain_drop,
                "certifiable": self.certifiable,
                "agreement_pct": self.agreement, "worst_domain_agreement_pct": self.worst_domain_agreement,
                "decided_by": "the 95 % upper bound" if self.certifiable else (
                    f"the point drops: {self.images} judge images cannot bound the drop within "
                    f"{self.budget:g} points even with no disagreement at all (more source "
                    "validation images would: data.val_fraction, export.fidelity_images)")}


def verdict(fidelity: Fidelity, budget: float) -> Verdict:
    """Apply the rule to one model's fidelity record."""
    pooled = fidelity.pooled
    n = sum(int(d.get("images", 0)) for d in fidelity.per_domain.values())
    upper = float(pooled["drop_upper95"])
    worst = float(fidelity.worst_drop)
    can = certifiable(n, budget)
    bound = upper if can else float(pooled["drop_points"])
    # A domain is held to the budget on its own only where one image is worth less than the
    # budget: on 84 images one flip is 1.19 points, noise that the pooled figure already counts.
    judged_alone = [float(d["drop_points"]) for d in fidelity.per_domain.values()
                    if float(d.get("points_per_image", 100.0)) < budget]
    per_domain_ok = all(drop <= budget for drop in judged_alone)
    domains = fidelity.per_domain.values()
    agreed = sum(float(d["agreement"]) * int(d.get("images", 0)) for d in domains)
    return Verdict(budget, bound <= budget and per_domain_ok, round(upper, 3),
                   float(pooled["drop_points"]), round(worst, 3), n, can,
                   round(agreed / max(n, 1), 3),
                   min((float(d["agreement"]) for d in domains), default=100.0))


def certifiable(images: int, budget: float) -> bool:
    """True when `images` judge images that all agree with FP32 would meet `budget`."""
    return images > 0 and paired_drop_bound(0, 0, images, 1.644854)[1] <= budget


def order_key(fidelity: Fidelity, budget: float, higher_precision_layers: int = 0
              ) -> tuple[bool, float, float, int]:
    """Smaller is better (the rule's 'best')."""
    v = verdict(fidelity, budget)
    return (not v.met, v.upper95, -round(fidelity.mean_agreement, 6), higher_precision_layers)
