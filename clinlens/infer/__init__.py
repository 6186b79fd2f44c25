"""MONAI Label adapters: parse the request, call a model, write the result."""
