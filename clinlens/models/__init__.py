"""Models: plain torch modules with no MONAI Label imports."""
