"""imagine: text-to-image diffusion built from the papers, offline on a CPU."""

__version__ = "0.1.0"
