"""Diffusion pipelines (diffusers' directory layout, ``model_index.json``) converted to and run in MLX.

``convert.py`` converts a pipeline component by component through the project's writer; ``sd.py`` loads one and
runs txt2img / img2img; ``unet.py``, ``vae.py`` and ``layers.py`` are the MLX models (diffusers' module names);
``schedulers.py`` the samplers (diffusers' own classes); ``validate.py`` compares each component and the whole
pipeline with diffusers / transformers.
"""

from mlxd_daemon.pipelines.sd import is_pipeline

__all__ = ["is_pipeline"]
