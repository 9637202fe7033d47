"""The distributex client: a Python library and the ``distributex`` command."""
