"""Where to run a job now. Pure: decides from the offers the cloud reports.

The first policy is the original system's: the cheapest spot market with capacity among the
job's instance types, at or under its max price; on-demand when no spot capacity exists and
on-demand is within the max price; otherwise wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbas.models import Market, Offer


@dataclass(frozen=True)
class Placement:
    zone: str
    instance_type: str
    market: Market
    price: float


def cheapest_spot(
    instance_types: list[str],
    max_price: float | None,
    offers: list[Offer],
    avoid: frozenset[tuple[str, str]] = frozenset(),
    ondemand: list[Offer] | None = None,
) -> Placement | None:
    """`ondemand`: the offers whose on-demand capacity may be tried (by default all of them)."""
    allowed = [offer for offer in offers if offer.instance_type in instance_types]
    spot = [
        offer for offer in allowed
        if offer.available
        and (max_price is None or offer.spot_price <= max_price)
        and (offer.zone, offer.instance_type) not in avoid
    ]
    if spot:
        best = min(spot, key=lambda o: (o.spot_price, instance_types.index(o.instance_type), o.zone))
        return Placement(best.zone, best.instance_type, "spot", best.spot_price)
    fallback = [offer for offer in (allowed if ondemand is None else ondemand)
                if offer.instance_type in instance_types and (max_price is None or offer.ondemand_price <= max_price)]
    if fallback:
        best = min(fallback, key=lambda o: (o.ondemand_price, instance_types.index(o.instance_type), o.zone))
        return Placement(best.zone, best.instance_type, "on-demand", best.ondemand_price)
    return None
