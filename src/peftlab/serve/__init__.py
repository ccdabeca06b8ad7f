"""Serve many adapters on one shared base model over HTTP (FastAPI + uvicorn).

Importing this package loads nothing: fastapi (the ``serve`` extra) and torch
are imported when :func:`create_app` or :func:`serve` is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`peftlab.serve.app.create_app`."""
    from peftlab.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """See :func:`peftlab.serve.app.serve`."""
    from peftlab.serve.app import serve as _serve

    _serve(*args, **kwargs)
