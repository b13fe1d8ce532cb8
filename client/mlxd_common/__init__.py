"""Facts both the client and the daemon need (the daemon never imports ``mlxd_client``): where the daemon
listens (``endpoint``), what a Hugging Face Hub id looks like (``hub_ids``). Imports neither mlx nor torch."""
