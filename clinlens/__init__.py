"""clinlens: region-aware CLIP for MONAI Label."""

__version__ = "0.1.0"
