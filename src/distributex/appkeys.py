"""The keys under which the web application keeps its shared parts.

A leaf of the web layer: every module that serves requests reads these, and
none of them need import another to find them.
"""

from __future__ import annotations

from aiohttp import web

from distributex.backends.base import LockBackend
from distributex.config import Config
from distributex.engine import PoolSpec
from distributex.events import Events

BACKEND_KEY: web.AppKey[LockBackend] = web.AppKey("backend", LockBackend)
CONFIG_KEY: web.AppKey[Config] = web.AppKey("config", Config)
EVENTS_KEY: web.AppKey[Events] = web.AppKey("events", Events)
# Pools a reload removed while they had holders or waiters: they drain (see reload.py).
DRAINING_KEY: web.AppKey[dict[str, PoolSpec]] = web.AppKey("draining", dict)
