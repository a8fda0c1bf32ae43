"""Repeatable command-line flags that pair with another repeatable flag (one value per entry)."""
from __future__ import annotations


def per_entry(values: list | None, n: int, flag: str, entries: str, default=None) -> list:
    """n values of `flag` for the n `entries` (e.g. --model): given once it applies to every entry, absent it is
    `default`, otherwise it must be given once per entry."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag} given {len(values)} times for {n} {entries}; give it once or once per {entries}")
    return values
