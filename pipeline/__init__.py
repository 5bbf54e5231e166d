"""PLW study pipeline: data, training, evaluation and analysis for prompt-loss-weight studies."""

__version__ = "0.1.0"
