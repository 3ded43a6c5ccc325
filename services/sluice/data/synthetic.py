"""The embedded default: a seeded shop with a catalog and shopper behaviour.

Categories come in departments; brands sell in a few categories; titles are
built from brand, descriptors, product noun and variant, so text similarity is
meaningful. Shoppers prefer a few categories and brands, drift between related
categories (shoes, then socks) and buy popular items more often, so
behaviour carries a learnable signal for every model in the cascade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sluice.data.catalog import Catalog
from sluice.data.interactions import Interactions

DEPARTMENTS: dict[str, dict[str, list[str]]] = {
    "running": {
        "running shoes": [
            "Trail Running Shoes",
            "Road Running Shoes",
            "Racing Flats",
            "Cushioned Runners",
        ],
        "running socks": ["Cushioned Running Socks", "Compression Socks", "No-Show Socks"],
        "running apparel": [
            "Running Shorts",
            "Running Tights",
            "Breathable Running Tee",
            "Wind Jacket",
        ],
        "hydration": ["Hydration Vest", "Handheld Water Bottle", "Running Belt"],
    },
    "yoga": {
        "yoga mats": ["Non-Slip Yoga Mat", "Travel Yoga Mat", "Thick Exercise Mat"],
        "yoga props": ["Cork Yoga Block", "Yoga Strap", "Meditation Cushion", "Yoga Bolster"],
        "yoga apparel": ["High-Waist Yoga Leggings", "Sports Bra", "Yoga Tank Top"],
    },
    "audio": {
        "headphones": [
            "Wireless Over-Ear Headphones",
            "Noise Cancelling Headphones",
            "Studio Headphones",
        ],
        "earbuds": ["True Wireless Earbuds", "Sport Earbuds", "Wired Earbuds"],
        "speakers": ["Bluetooth Speaker", "Waterproof Speaker", "Smart Speaker", "Soundbar"],
    },
    "kitchen": {
        "coffee": [
            "Espresso Machine",
            "Pour-Over Coffee Maker",
            "Burr Coffee Grinder",
            "French Press",
        ],
        "cookware": [
            "Cast Iron Skillet",
            "Nonstick Frying Pan",
            "Stainless Saucepan",
            "Dutch Oven",
        ],
        "knives": ["Chef Knife", "Paring Knife", "Knife Sharpener", "Bread Knife"],
    },
    "beauty": {
        "skincare": [
            "Hydrating Face Serum",
            "Daily Moisturizer",
            "Gentle Cleanser",
            "Vitamin C Serum",
        ],
        "makeup": [
            "Matte Lipstick",
            "Liquid Foundation",
            "Eyeshadow Palette",
            "Waterproof Mascara",
        ],
        "haircare": ["Repair Shampoo", "Leave-In Conditioner", "Hair Oil", "Curl Cream"],
        "fragrance": ["Eau de Parfum", "Body Mist", "Cologne"],
    },
    "outdoor": {
        "camping": ["Two-Person Tent", "Sleeping Bag", "Camping Stove", "Headlamp"],
        "hiking": ["Hiking Boots", "Trekking Poles", "Daypack", "Hiking Socks"],
    },
}
DESCRIPTORS = [
    "Ultra",
    "Pro",
    "Classic",
    "Lightweight",
    "Premium",
    "Eco",
    "Essential",
    "Max",
    "Compact",
    "Sport",
]
VARIANTS = [
    "Black",
    "White",
    "Blue",
    "Red",
    "Green",
    "Grey",
    "Navy",
    "Small",
    "Large",
    "Limited Edition",
]
COLORS = frozenset(VARIANTS[:7])  # the variants that are a colour (the item's colour)
BRAND_STEMS = [
    "Acme",
    "Northwind",
    "Bluepeak",
    "Solace",
    "Verde",
    "Kestrel",
    "Lumen",
    "Orbit",
    "Tundra",
    "Vela",
    "Halcyon",
    "Quill",
    "Marlow",
    "Pioneer",
    "Zephyr",
    "Cobalt",
    "Juniper",
    "Atlas",
    "Nimbus",
    "Ember",
    "Fathom",
    "Granite",
    "Harbor",
    "Ivory",
    "Jasper",
    "Koda",
    "Lark",
    "Meridian",
    "Nova",
    "Onyx",
]


@dataclass(frozen=True)
class ShopSpec:
    """Size and seed of a generated shop."""

    num_items: int = 5000
    num_users: int = 3000
    mean_events_per_user: float = 14.0
    seed: int = 7


def generate_shop(spec: ShopSpec) -> tuple[Catalog, Interactions]:
    """Generate a catalog and an interaction log, identical for identical specs."""
    rng = np.random.default_rng(spec.seed)
    categories = [(dept, cat) for dept, cats in DEPARTMENTS.items() for cat in cats]
    n_cat = len(categories)
    dept_of = np.array([list(DEPARTMENTS).index(d) for d, _ in categories])

    brands = [f"{stem}{suffix}" for suffix in ("", " Labs", " Co") for stem in BRAND_STEMS]
    brand_cats = [rng.choice(n_cat, size=rng.integers(1, 4), replace=False) for _ in brands]
    sellers_of: list[list[int]] = [[] for _ in range(n_cat)]
    for b, cats in enumerate(brand_cats):
        for c in cats:
            sellers_of[int(c)].append(b)
    for c in range(n_cat):
        if not sellers_of[c]:
            sellers_of[c].append(int(rng.integers(len(brands))))

    cat_weight = rng.dirichlet(np.full(n_cat, 2.0))
    item_cat = rng.choice(n_cat, size=spec.num_items, p=cat_weight)
    seller_pick = rng.random(spec.num_items)
    item_brand = np.array(
        [
            sellers_of[c][int(r * len(sellers_of[c]))]
            for c, r in zip(item_cat.tolist(), seller_pick.tolist(), strict=True)
        ]
    )
    base_price = {c: float(rng.uniform(8, 250)) for c in range(n_cat)}
    nouns = [DEPARTMENTS[dept][cat] for dept, cat in categories]
    noun_pick = rng.random(spec.num_items)
    descriptor = rng.integers(len(DESCRIPTORS), size=spec.num_items)
    variant = rng.integers(len(VARIANTS), size=spec.num_items)
    titles = [
        f"{brands[b]} {DESCRIPTORS[d]} {nouns[c][int(r * len(nouns[c]))]} - {VARIANTS[v]}"
        for c, b, r, d, v in zip(
            item_cat.tolist(),
            item_brand.tolist(),
            noun_pick.tolist(),
            descriptor.tolist(),
            variant.tolist(),
            strict=True,
        )
    ]
    cat_price = np.array([base_price[c] for c in range(n_cat)])
    prices = np.round(
        cat_price[item_cat] * rng.lognormal(0.0, 0.35, size=spec.num_items) * 100
    ).astype(np.int64)
    in_stock = rng.random(spec.num_items) > 0.08
    quality = rng.pareto(1.6, size=spec.num_items) + 1.0  # long-tailed item appeal

    related = np.where(dept_of[:, None] == dept_of[None, :], 4.0, 0.15)
    np.fill_diagonal(related, 10.0)
    related /= related.sum(axis=1, keepdims=True)
    sampler = _ItemSampler(item_cat, item_brand, quality, n_cat)

    users, rows, stamps = [], [], []
    t0 = 1_700_000_000
    for u in range(spec.num_users):
        fav = rng.dirichlet(np.full(n_cat, 0.3))
        brand_boost = 1.0 + 30.0 * rng.dirichlet(np.full(len(brands), 0.2))
        length = max(5, int(rng.poisson(spec.mean_events_per_user)))
        c = int(rng.choice(n_cat, p=fav))
        t = t0 + int(rng.integers(0, 86_400 * 60))
        seen: set[int] = set()
        for _ in range(length):
            if not sampler.has_items(c):
                c = int(rng.choice(n_cat, p=fav))
                continue
            item = sampler.draw(rng, c, brand_boost, seen)
            seen.add(item)
            users.append(u)
            rows.append(item)
            stamps.append(t)
            t += int(rng.exponential(3600 * 6))
            mix = 0.5 * related[c] + 0.5 * fav
            c = int(rng.choice(n_cat, p=mix / mix.sum()))

    catalog = Catalog.from_columns(
        item_ids=list(range(1001, 1001 + spec.num_items)),
        titles=titles,
        categories=[categories[c][1] for c in item_cat],
        brands=[brands[b] for b in item_brand],
        colors=[v.lower() if v in COLORS else "" for v in (VARIANTS[i] for i in variant)],
        price_cents=prices.tolist(),
        in_stock=in_stock.tolist(),
    )
    interactions = Interactions(
        user_ids=[f"u{u:05d}" for u in range(spec.num_users)],
        user_index=np.asarray(users, dtype=np.int32),
        item_rows=np.asarray(rows, dtype=np.int64),
        timestamps=np.asarray(stamps, dtype=np.int64),
    )
    return catalog, interactions


class _ItemSampler:
    """Draws an item of a category with probability ``quality * brand_boost[brand]``,
    an item the user has already seen 20 times less likely.

    Two steps instead of one weighted draw over the whole category: the brand (a
    handful per category, from precomputed quality sums), then the item within the
    (category, brand) cell by quality (a binary search in a precomputed cumulative
    sum). Seen items are down-weighted by rejection, which gives exactly the same
    distribution. Per event this costs O(brands in the category), not O(items).
    """

    SEEN_ACCEPT = 0.05

    def __init__(
        self, item_cat: np.ndarray, item_brand: np.ndarray, quality: np.ndarray, n_cat: int
    ) -> None:
        self.cell_brands: list[np.ndarray] = []  # brands selling in each category
        self.cell_mass: list[np.ndarray] = []  # their summed item quality
        self.cell_items: dict[tuple[int, int], np.ndarray] = {}
        self.cell_cdf: dict[tuple[int, int], np.ndarray] = {}
        for c in range(n_cat):
            in_cat = np.flatnonzero(item_cat == c)
            brands = np.unique(item_brand[in_cat])
            masses = []
            for b in brands.tolist():
                items = in_cat[item_brand[in_cat] == b]
                cdf = np.cumsum(quality[items])
                self.cell_items[(c, b)] = items
                self.cell_cdf[(c, b)] = cdf
                masses.append(cdf[-1])
            self.cell_brands.append(brands)
            self.cell_mass.append(np.asarray(masses, dtype=np.float64))

    def has_items(self, c: int) -> bool:
        return len(self.cell_brands[c]) > 0

    def draw(
        self, rng: np.random.Generator, c: int, brand_boost: np.ndarray, seen: set[int]
    ) -> int:
        brands = self.cell_brands[c]
        w = self.cell_mass[c] * brand_boost[brands]
        cum = np.cumsum(w)
        while True:
            b = int(brands[min(int(np.searchsorted(cum, rng.random() * cum[-1])), len(brands) - 1)])
            cdf = self.cell_cdf[(c, b)]
            k = min(int(np.searchsorted(cdf, rng.random() * cdf[-1])), len(cdf) - 1)
            item = int(self.cell_items[(c, b)][k])
            if item not in seen or rng.random() < self.SEEN_ACCEPT:
                return item
