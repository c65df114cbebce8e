"""Datasets, derived labels and partitioners."""
