"""Datasets: manifests and layouts, WebDataset shards, and packing, splitting and checking them."""

__all__: list[str] = []
