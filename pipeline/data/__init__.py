"""Data stage: sources, validation, prompt inversion, statistics and the processed-dataset store."""

from __future__ import annotations

from typing import Dict

from pipeline.data import inversion, records


def code_versions() -> Dict[str, int]:
    """Versions of the data code that change a processed dataset's content (the record validation
    and the prompt inversion). The store's content hash covers them (pipeline/data/store.py); a run's
    identity includes them too (pipeline.runs.run_identity), since it is computed from the config
    before the dataset is built (its content hash needs the raw file and the tokenizer)."""
    return {"transform": inversion.TRANSFORM_VERSION, "records": records.RECORDS_VERSION}
