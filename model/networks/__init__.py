"""Encoder/decoder networks: the seed VQ-VAE and the VQGAN family (``vqgan``)."""
