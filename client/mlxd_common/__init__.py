"""Facts both the client and the daemon need, in a package that imports neither grpc, mlx nor torch."""
