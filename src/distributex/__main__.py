"""``python -m distributex`` runs the server, like ``distributexd``."""

import sys

from distributex.server import main

sys.exit(main())
