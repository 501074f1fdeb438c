"""Datasets: format readers and converters, identity data, split, encoding with label masks, packing, caching."""
