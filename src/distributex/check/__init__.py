"""``distributex check``: random clients record a history; a pure checker proves the rules."""
