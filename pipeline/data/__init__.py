"""Data stage: sources, validation, prompt inversion, statistics and the processed-dataset store."""
