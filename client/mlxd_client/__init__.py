"""Python client for the mlxd daemon. Importing this never imports mlx or torch."""

from mlxd_client.client import Client
from mlxd_client.errors import MlxdClientError

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "Client", "MlxdClientError", "__version__"]
