"""Training: the KL autoencoder and text-conditioned diffusion models (pixel or latent space)."""
