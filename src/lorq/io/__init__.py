"""File formats: lorq's native directory (more formats join with export)."""

from lorq.io.native import LORQ_FILE, WEIGHTS_FILE, load, save

__all__ = ["LORQ_FILE", "WEIGHTS_FILE", "load", "save"]
