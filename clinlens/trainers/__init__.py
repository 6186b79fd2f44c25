"""Training loops and MONAI Label TrainTask adapters."""
