"""``geobind serve``: a web explorer (FastAPI + a Leaflet page) over a model and an index.

Needs the serve extra: ``pip install 'geobind[serve]'``.
"""

from geobind.serve.app import create_app

__all__ = ["create_app"]
