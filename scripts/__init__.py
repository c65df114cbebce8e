"""Command-line helpers around the Flower CLI (not part of the Flower app)."""
