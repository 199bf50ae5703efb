"""silence."""
