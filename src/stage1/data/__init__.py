"""Data: reading and validating bars, windows, features, normalisation, masking, datasets."""
