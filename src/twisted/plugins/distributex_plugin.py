"""Twisted plugin: ``twistd distributex`` runs the distributex lock server.

This directory has no ``__init__.py`` on purpose: Twisted collects
``twisted/plugins`` directories from every ``sys.path`` entry, and an
``__init__.py`` here would shadow Twisted's own ``twisted.plugins`` package.
The plugin stays cheap to import (twistd imports every plugin to list its
commands); the server code loads only when ``twistd distributex`` runs.
"""

from twisted.application.service import ServiceMaker

distributex = ServiceMaker(
    "distributex",
    "distributex.twisted_service",
    "Distributex lock server (HTTP mutexes and semaphores)",
    "distributex",
)
