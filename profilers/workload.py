"""What is timed: `Workload`, defined in the shared leaf module (amoeba_export.shared_types)."""
from amoeba_export.shared_types import METRICS, Workload  # noqa: F401
