"""``distributex check``'s parts: random clients record a history, a pure checker proves the rules."""
