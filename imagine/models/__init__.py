"""Networks: the U-Net denoiser, the KL autoencoder, text encoders, and their shared layers."""
