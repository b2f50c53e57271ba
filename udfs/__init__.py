"""Batch compute run inside Python workers (and without Spark): pure functions over Arrow/pandas batches."""
