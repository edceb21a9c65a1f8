"""Figures of loopdyn, drawn in one style."""
