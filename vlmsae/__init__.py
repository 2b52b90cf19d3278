"""vlmsae: sparse autoencoders on the vision encoders of vision-language models."""

__version__ = "0.1.0"
