"""Slot values (products, cities, dates, ...) for :mod:`stream_distill.data.synthetic`."""

from __future__ import annotations

PRODUCTS: tuple[str, ...] = (
    "pair of wireless earbuds",
    "coffee maker",
    "pair of running shoes",
    "yoga mat",
    "air fryer",
    "smart watch",
    "phone case",
    "winter jacket",
    "desk lamp",
    "bluetooth speaker",
    "backpack",
    "office chair",
    "blender",
    "hair dryer",
    "gaming mouse",
    "mechanical keyboard",
    "4k monitor",
    "electric toothbrush",
    "vacuum cleaner",
    "baby stroller",
    "pair of jeans",
    "pair of sunglasses",
    "tablet",
    "robot vacuum",
    "espresso machine",
    "kettle",
    "duvet cover",
    "tent",
    "suitcase",
    "fitness tracker",
)
CITIES: tuple[str, ...] = (
    "london",
    "manchester",
    "berlin",
    "paris",
    "madrid",
    "new york",
    "chicago",
    "austin",
    "seattle",
    "toronto",
    "sydney",
    "dublin",
    "amsterdam",
    "milan",
    "boston",
    "denver",
)
MONTHS: tuple[str, ...] = (
    "jan",
    "feb",
    "march",
    "april",
    "may",
    "june",
    "july",
    "aug",
    "sept",
    "oct",
    "nov",
    "dec",
)
RELATIVE_DATES: tuple[str, ...] = (
    "monday",
    "last tuesday",
    "yesterday",
    "the weekend",
    "last week",
    "friday",
    "the 5th",
    "two weeks ago",
)
ETAS: tuple[str, ...] = (
    "tomorrow",
    "on Friday",
    "within 2 days",
    "by Monday",
    "later today",
    "next week",
)
COUPON_WORDS: tuple[str, ...] = ("SAVE", "WELCOME", "SPRING", "VIP", "FREESHIP", "HELLO", "DEAL")
NAMES: tuple[str, ...] = ("anna", "tom", "maria", "j.smith", "lee", "sam", "priya", "omar", "kate")
DOMAINS: tuple[str, ...] = ("gmail.com", "yahoo.com", "outlook.com", "mail.com", "icloud.com")
CURRENCIES: tuple[str, ...] = ("$", "$", "€", "£")
ORDER_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
