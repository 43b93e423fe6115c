"""Loading models offline: model folders (ours and diffusers') and original Stable Diffusion
single-file checkpoints. No function here ever calls the hub."""

from imagine.loading.folder import Components, load_folder


def load_single_file(*args, **kwargs):
    """See `imagine.loading.single_file.load_single_file` (imported on first use)."""
    from imagine.loading.single_file import load_single_file as load

    return load(*args, **kwargs)


def load(path, dtype=None, **kwargs) -> Components:
    """A model folder (with model_index.json) or a single-file checkpoint -> Components."""
    import os

    import torch

    dtype = torch.float32 if dtype is None else dtype
    if os.path.isdir(path):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} apply to single-file checkpoints, not to the folder {path}")
        return load_folder(path, dtype=dtype)
    return load_single_file(path, dtype, **kwargs)


__all__ = ["Components", "load", "load_folder", "load_single_file"]
