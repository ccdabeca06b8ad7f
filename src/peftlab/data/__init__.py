"""Data stage: read any supported source, clean, label, de-duplicate, split, report."""

from peftlab.data.prepare import DataReport, PreparedData, Split, clean_text, prepare_data

__all__ = ["DataReport", "PreparedData", "Split", "clean_text", "prepare_data"]
