"""fidmed: train StyleGAN2 generators on medical images and score them with Frechet distances
from many feature extractors, with the protocol of every number recorded."""

__version__ = "0.1.0"
