"""twa: Trainable Weight Averaging of checkpoint folders, with SWA and single-checkpoint baselines."""

__version__ = "0.1.0"

#: The version of the keys of every JSON document twa writes or prints (report.json, the --dry-run plans,
#: `twa inspect --json`): one number for all of them; see docs/report.md for how it changes.
SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "__version__"]
