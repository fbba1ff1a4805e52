"""twa: Trainable Weight Averaging of checkpoint folders, with SWA and single-checkpoint baselines."""

__version__ = "0.1.0"

__all__ = ["__version__"]
