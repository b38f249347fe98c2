"""The packaged teacher and data: fetched once into a cache, checked, then reused.

- :mod:`~alignkd.assets.store`: where assets live, their pinned sources, the manifest.
- :mod:`~alignkd.assets.build`: :func:`prepare`, each asset's steps in order.
- :mod:`~alignkd.assets.teacher`, :mod:`~alignkd.assets.corpus`,
  :mod:`~alignkd.assets.sentiment`: how each asset is built and checked.
- :mod:`~alignkd.assets.download`: pip and npm, the registries' own clients.
"""

from alignkd.assets.build import describe, prepare, prepared
from alignkd.assets.store import NAMES, SOURCES, Assets, cache_dir
from alignkd.errors import AssetError

__all__ = ["NAMES", "SOURCES", "AssetError", "Assets", "cache_dir", "describe", "prepare", "prepared"]
