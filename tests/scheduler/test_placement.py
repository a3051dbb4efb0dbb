from cbas.models import Offer
from cbas.scheduler.placement import Placement, cheapest_spot


def offer(zone: str, kind: str, spot: float, ondemand: float, available: bool = True) -> Offer:
    return Offer(zone=zone, instance_type=kind, spot_price=spot, ondemand_price=ondemand, available=available)


OFFERS = [
    offer("a", "c5.large", 0.030, 0.085),
    offer("b", "c5.large", 0.025, 0.085, available=False),
    offer("c", "c5.large", 0.028, 0.085),
    offer("a", "m5.large", 0.020, 0.096),
]


def test_cheapest_available_spot_among_allowed_types() -> None:
    assert cheapest_spot(["c5.large"], None, OFFERS) == Placement("c", "c5.large", "spot", 0.028)
    assert cheapest_spot(["c5.large", "m5.large"], None, OFFERS) == Placement("a", "m5.large", "spot", 0.020)


def test_max_price_and_avoided_markets() -> None:
    # c avoided, a above the max price, b without capacity, on-demand above the max: wait
    assert cheapest_spot(["c5.large"], 0.029, OFFERS, avoid=frozenset({("c", "c5.large")})) is None
    assert cheapest_spot(["c5.large"], None, OFFERS, avoid=frozenset({("c", "c5.large")})) == Placement(
        "a", "c5.large", "spot", 0.030)
    assert cheapest_spot(["c5.large"], 0.0285, OFFERS) == Placement("c", "c5.large", "spot", 0.028)


def test_on_demand_when_no_spot_capacity_and_wait_when_too_dear() -> None:
    none_free = [offer("a", "c5.large", 0.03, 0.085, available=False)]
    assert cheapest_spot(["c5.large"], None, none_free) == Placement("a", "c5.large", "on-demand", 0.085)
    assert cheapest_spot(["c5.large"], 0.05, none_free) is None
    assert cheapest_spot(["x1.huge"], None, OFFERS) is None
