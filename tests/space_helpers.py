"""Shared helpers for the tests of embedding, search and maps (tiny models, seeded data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geobind.search.embed import FORMAT, FORMAT_VERSION, Embeddings


def clustered_unit_vectors(
    n: int, dim: int, *, clusters: int = 40, latent: int = 8, noise: float = 0.15, seed: int = 0
) -> np.ndarray:
    """Unit vectors with structure like real embeddings: a mixture of clusters in a
    ``latent``-dimensional subspace plus a little isotropic noise (seeded)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(latent, dim))
    centres = rng.normal(size=(clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, latent))
    x = z @ basis + noise * np.sqrt(latent) * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def synthetic_embeddings(
    vectors: np.ndarray,
    *,
    identity: str = "test-identity",
    modality: str = "satellite",
    seed: int = 0,
    captions: bool = True,
) -> Embeddings:
    """An in-memory :class:`Embeddings` with random coordinates and ids ``p0..``."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": modality,
        "dim": dim,
        "dtype": str(vectors.dtype),
        "model": {"identity": identity, "encoder": "test"},
        "dataset": {"source": "synthetic", "rows": n},
    }
    return Embeddings(
        ids=[f"p{i}" for i in range(n)],
        lat=rng.uniform(-60, 60, n),
        lon=rng.uniform(-170, 170, n),
        vectors=vectors,
        header=header,
        captions=[f"place {i}" for i in range(n)] if captions else None,
    )


def saved_space(tiny_data, root: Path) -> Path:
    """The tiny four-modality space of ``test_model.build_space``, saved under ``root``."""
    from test_model import build_space

    path = root / "model"
    if not (path / "geobind.json").is_file():
        build_space(tiny_data).save_pretrained(path)
    return path


def perturbed_copy(model):
    """A deep copy of ``model`` whose satellite encoder's weights differ slightly."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        p = next(other.encoder("satellite").parameters())
        p.add_(0.01)
    return other
