"""Where amoeba-export keeps things outside an artifact.

What ships inside the package (the default model's strategy and its measured host tables) is read,
never written. What a run makes goes to the user's folders, picked by platformdirs and overridable
by environment variables (or `--tables`):

- cache (`AMOEBA_EXPORT_CACHE`): the converted default model, calibrated strategies, weight digests;
- data (`AMOEBA_EXPORT_DATA`): measured and estimated latency tables (`AMOEBA_EXPORT_TABLES` or
  `--tables` for the tables alone), accuracy tables scored for a shipped strategy.

So an editable checkout and an installed wheel behave alike: nothing is written into the source
tree or site-packages.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHIPPED_STRATEGIES = PACKAGE / "strategies"
SHIPPED_TABLES = PACKAGE / "latency_tables"
APP = "amoeba-export"


def cache_dir() -> Path:
    if os.environ.get("AMOEBA_EXPORT_CACHE"):
        return Path(os.environ["AMOEBA_EXPORT_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    if os.environ.get("AMOEBA_EXPORT_DATA"):
        return Path(os.environ["AMOEBA_EXPORT_DATA"])
    import platformdirs

    return Path(platformdirs.user_data_dir(APP))


def tables_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where latency tables are written (and looked up first): `--tables`, else the environment, else data."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("AMOEBA_EXPORT_TABLES"):
        return Path(os.environ["AMOEBA_EXPORT_TABLES"])
    return data_dir() / "latency_tables"


def shipped(path: Path) -> bool:
    """Whether `path` lies inside the installed package (read-only for us)."""
    try:
        Path(path).resolve().relative_to(PACKAGE)
        return True
    except ValueError:
        return False
