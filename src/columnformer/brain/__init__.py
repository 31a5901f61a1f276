"""Model meets brain: feature export for comparisons with recordings (features.py)."""
