"""Generate the `market-reports` example dataset (examples/data/market-reports/).

Short commodity and equity market reports in the style of a news wire, produced from templates
by this script with a fixed seed, so the data is reproducible and free of third-party rights.
Source: written for finetune-operator; licence: Apache-2.0, like the repository.

    python examples/data/make_market_reports.py   # rewrites train.jsonl and eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMPANIES = [
    ("Northgate Mining", "NGM", "mining"), ("Harbor Bancorp", "HBC", "banking"),
    ("Calder Energy", "CLE", "energy"), ("Westfield Grain", "WFG", "agriculture"),
    ("Orion Steel", "ORS", "steel"), ("Lakeside Airlines", "LKA", "airline"),
    ("Pioneer Rail", "PRL", "rail"), ("Summit Foods", "SMF", "food"),
    ("Bayview Insurance", "BVI", "insurance"), ("Redwood Paper", "RWP", "paper"),
    ("Atlas Chemicals", "ATC", "chemicals"), ("Meridian Telecom", "MTC", "telecom"),
]
COMMODITIES = [
    ("crude oil", "barrel", 60, 95), ("gold", "ounce", 1700, 2400), ("copper", "tonne", 7000, 10500),
    ("wheat", "bushel", 5, 9), ("coffee", "pound", 1, 3), ("sugar", "pound", 0.15, 0.30),
]
CITIES = ["London", "New York", "Chicago", "Tokyo", "Sydney", "Frankfurt", "Toronto", "Singapore"]
REASONS_UP = [
    "stronger than expected demand", "supply disruptions", "a weaker dollar",
    "an upbeat industry survey", "lower inventories", "renewed buying by funds",
]
REASONS_DOWN = [
    "weaker demand", "rising inventories", "a stronger dollar",
    "profit taking", "concerns about the economy", "higher output",
]
ANALYSTS = ["said an analyst at a brokerage", "traders said", "dealers said", "a fund manager said"]


def company_report(rng: random.Random) -> str:
    name, ticker, sector = rng.choice(COMPANIES)
    city = rng.choice(CITIES)
    quarter = rng.choice(["first", "second", "third", "fourth"])
    profit = rng.randint(12, 900)
    change = rng.randint(2, 45)
    up = rng.random() < 0.6
    revenue = round(profit * rng.uniform(4, 12))
    direction = "rose" if up else "fell"
    outlook = rng.choice(
        ["expects demand to stay firm", "sees a difficult year ahead", "will raise its dividend",
         "plans to cut costs", "keeps its forecast unchanged"]
    )
    return (
        f"{city}, {name} ({ticker}) said net profit {direction} {change} percent to {profit} million dollars "
        f"in the {quarter} quarter, on revenue of {revenue} million dollars. The {sector} company "
        f"{outlook}. Shares of {name} {'gained' if up else 'lost'} {rng.randint(1, 9)}.{rng.randint(0, 9)} percent "
        f"in early trading, {rng.choice(ANALYSTS)}."
    )


def commodity_report(rng: random.Random) -> str:
    name, unit, low, high = rng.choice(COMMODITIES)
    city = rng.choice(CITIES)
    price = rng.uniform(low, high)
    up = rng.random() < 0.5
    move = price * rng.uniform(0.005, 0.04)
    reason = rng.choice(REASONS_UP if up else REASONS_DOWN)
    decimals = 2 if price < 100 else 0
    return (
        f"{city}, {name.capitalize()} prices {'rose' if up else 'fell'} {move:.{decimals}f} dollars to "
        f"{price:.{decimals}f} dollars a {unit} on {reason}, {rng.choice(ANALYSTS)}. "
        f"{'Buyers' if up else 'Sellers'} were active through the session and volume was "
        f"{rng.choice(['heavy', 'light', 'average'])}."
    )


def rates_report(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    rate = rng.choice([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    action = rng.choice(["raised", "cut", "held"])
    text = f"{city}, The central bank {action} its main interest rate"
    text += f" to {rate} percent" if action != "held" else f" at {rate} percent"
    return text + (
        f", citing {rng.choice(['inflation', 'growth', 'the labour market', 'the currency'])}. "
        f"Bond yields {rng.choice(['rose', 'fell', 'were steady'])} after the decision, {rng.choice(ANALYSTS)}."
    )


def main() -> None:
    rng = random.Random(20261129)
    makers = [company_report, commodity_report, rates_report]
    records = [{"text": rng.choice(makers)(rng)} for _ in range(440)]
    out = Path(__file__).resolve().parent / "market-reports"
    out.mkdir(exist_ok=True)
    for name, part in (("train.jsonl", records[:400]), ("eval.jsonl", records[400:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main()
