"""mlxd daemon: gRPC front end plus MLX worker processes."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
