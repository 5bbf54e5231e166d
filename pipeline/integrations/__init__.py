"""The project's prompt loss weight where users already train (``pipeline.integrations.hf``)."""
