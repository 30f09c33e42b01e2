"""Spatial splits: whole geographic cells are held out for validation and test.

Every candidate place lies in a ``cell_deg`` x ``cell_deg`` cell. Candidates closer than
``buffer_km`` to their own cell's edge are dropped, so two places in different cells are always
at least ``2 * buffer_km`` apart (their satellite tiles never overlap). Cells are then given a
role (train, val, test) so that each held-out role holds enough places of every scene, and each
split draws its places from its role's cells with equal quotas per scene (capped by what exists).
"""

from __future__ import annotations

import numpy as np

from geobind.data.world.places import Places, cell_of, distance_to_cell_edge_km

ROLES = ("train", "val", "test")


def _waterfill(total: int, avail: np.ndarray) -> np.ndarray:
    """Equal shares of ``total`` over scenes, capped by ``avail``; what a scarce scene cannot
    take goes to the others."""
    alloc = np.zeros_like(avail)
    remaining = int(total)
    order = np.argsort(avail, kind="stable")
    for i, s in enumerate(order):
        alloc[s] = min(int(avail[s]), remaining // (len(order) - i))
        remaining -= int(alloc[s])
    return alloc


def _apportion(rest: np.ndarray, k: float) -> np.ndarray:
    """Integer shares of ``k`` items proportional to ``rest`` (largest remainders), <= rest."""
    k = int(round(min(k, rest.sum())))
    exact = rest * k / max(int(rest.sum()), 1)
    share = np.floor(exact).astype(np.int64)
    for s in np.argsort(-(exact - share), kind="stable")[: k - int(share.sum())]:
        share[s] += 1
    return np.minimum(share, rest)


def assign_cells(
    cells: np.ndarray,
    scene: np.ndarray,
    n_scenes: int,
    need: dict[str, int],
    rng: np.random.Generator,
    *,
    min_cell_frac: dict[str, float] | None = None,
    max_scene_frac: float = 0.4,
) -> dict[int, str]:
    """Give every cell a role. ``need[role]`` is the number of places per scene the held-out
    role should be able to draw; ``min_cell_frac[role]`` the smallest share of all cells it gets.
    No held-out role takes more than ``max_scene_frac`` of any scene's candidates."""
    min_cell_frac = min_cell_frac or {}
    uniq = np.unique(cells)
    pos = {int(c): i for i, c in enumerate(uniq)}
    counts = np.zeros((len(uniq), n_scenes), dtype=np.int64)
    np.add.at(counts, (np.searchsorted(uniq, cells), scene), 1)
    total = counts.sum(axis=0)
    cap = max_scene_frac * total
    order = [int(c) for c in rng.permutation(uniq)]
    role: dict[int, str] = {}
    for held in ("test", "val"):
        have = np.zeros(n_scenes, dtype=np.int64)
        n_cells = 0

        def fits(c: int, have: np.ndarray) -> bool:
            # A cell rich in some scene must not take too much of it away from training.
            return c not in role and not np.any(have + counts[pos[c]] > cap)

        for s in np.argsort(total, kind="stable"):  # rarest scene first
            for c in order:
                if have[s] >= min(need.get(held, 0), cap[s]):
                    break
                if counts[pos[c], s] and fits(c, have):
                    role[c] = held
                    have += counts[pos[c]]
                    n_cells += 1
        goal = int(np.ceil(min_cell_frac.get(held, 0.0) * len(uniq)))
        for c in order:
            if n_cells >= goal:
                break
            if fits(c, have):
                role[c] = held
                have += counts[pos[c]]
                n_cells += 1
    for c in order:
        role.setdefault(c, "train")
    return role


def draw_splits(
    places: Places,
    sizes: dict[str, int],
    split_role: dict[str, str],
    n_scenes: int,
    *,
    cell_deg: float,
    buffer_km: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Indices into ``places`` for every split (disjoint), and the role of every cell.

    ``sizes`` maps split name to its number of places, ``split_role`` split name to its role.
    Splits of one role draw jointly, so a scarce scene is shared in proportion to split sizes.
    """
    keep = np.flatnonzero(distance_to_cell_edge_km(places.lat, places.lon, cell_deg) >= buffer_km)
    cells = cell_of(places.lat[keep], places.lon[keep], cell_deg)
    scene = places.scene[keep]
    need: dict[str, int] = {}
    for name, n in sizes.items():
        r = split_role[name]
        need[r] = need.get(r, 0) + int(np.ceil(1.5 * n / n_scenes))
    role = assign_cells(
        cells, scene, n_scenes, need, rng, min_cell_frac={"test": 0.12, "val": 0.06}
    )
    cell_role = np.array([role[int(c)] for c in cells])
    out: dict[str, np.ndarray] = {}
    for r in ROLES:
        names = [n for n in sizes if split_role[n] == r]
        if not names:
            continue
        pool = keep[cell_role == r]
        by_scene = [rng.permutation(pool[places.scene[pool] == s]) for s in range(n_scenes)]
        avail = np.array([len(b) for b in by_scene])
        n_role = sum(sizes[n] for n in names)
        alloc = _waterfill(n_role, avail)
        taken = np.zeros(n_scenes, dtype=np.int64)
        left = n_role
        for i, name in enumerate(names):
            # Proportional share of each scene's allocation; the last split takes the rest.
            rest = alloc - taken
            share = (
                rest if i == len(names) - 1 else _apportion(rest, sizes[name] * rest.sum() / left)
            )
            left -= sizes[name]
            idx = np.concatenate(
                [by_scene[s][taken[s] : taken[s] + share[s]] for s in range(n_scenes)]
            )
            taken += share
            out[name] = rng.permutation(idx)
    return out, role


__all__ = ["assign_cells", "draw_splits"]
