"""Defaults of daskptycho in ``dask.config`` (namespace ``daskptycho``)."""

from __future__ import annotations

import os

import dask.config
import yaml

_fn = os.path.join(os.path.dirname(__file__), "daskptycho.yaml")
with open(_fn) as f:
    _defaults = yaml.safe_load(f)

dask.config.update_defaults(_defaults)


def get(key: str, default=None):
    """Look up ``daskptycho.<key>`` in dask's configuration."""
    return dask.config.get(f"daskptycho.{key}", default=default)
