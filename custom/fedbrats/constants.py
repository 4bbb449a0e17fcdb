"""Names shared by every part of the package: sequences, regions and their canonical order."""

from __future__ import annotations

import itertools

#: Canonical MRI sequences, in the channel order every model and datalist uses.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: Output regions, in the channel order of every segmentation model (BraTS evaluation regions).
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")

#: HD95 given to a case whose prediction or ground truth misses a region (BraTS challenge convention, mm).
HD95_MISS_VALUE: float = 373.13


def modality_combinations() -> list[tuple[str, ...]]:
    """All 15 non-empty subsets of :data:`MODALITIES`, smallest first, in canonical order.

    Returns:
        The combinations as tuples of modality names, e.g. ``("t1",)`` ... ``("t1", "t1ce", "t2", "flair")``.
    """
    combos: list[tuple[str, ...]] = []
    for size in range(1, len(MODALITIES) + 1):
        combos.extend(itertools.combinations(MODALITIES, size))
    return combos


def combination_name(modalities: tuple[str, ...] | list[str]) -> str:
    """Short readable name of a modality subset, e.g. ``"t1+flair"``, in canonical order."""
    return "+".join(m for m in MODALITIES if m in set(modalities))


def modality_mask(available: list[str] | tuple[str, ...]) -> list[bool]:
    """Boolean mask over :data:`MODALITIES` for a set of available sequences.

    Raises:
        ValueError: if ``available`` names an unknown sequence or is empty.
    """
    unknown = sorted(set(available) - set(MODALITIES))
    if unknown:
        raise ValueError(f"available modalities {unknown} are not among {list(MODALITIES)}")
    if not available:
        raise ValueError(f"available modalities must name at least one of {list(MODALITIES)}")
    return [m in set(available) for m in MODALITIES]
