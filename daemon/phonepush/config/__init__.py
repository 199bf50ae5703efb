"""The configuration: pydantic models, loading and cross-checks.

A leaf: it imports no I/O library, so anything may depend on it. Its public names are those of
:mod:`phonepush.config.model`, listed once there.
"""

from phonepush.config import model as _model
from phonepush.config.model import *  # noqa: F403

__all__ = _model.__all__
