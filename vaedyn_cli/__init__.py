"""vaedyn: track, classify and revive inactive channels of the SDXL VAE while it trains."""

__version__ = "0.1.0"
