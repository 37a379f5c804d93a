"""neurimg: images as neural fields (modulated SIREN networks)."""

__version__ = "0.1.0"
