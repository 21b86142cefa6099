"""The pipeline library: config, data preparation, loaders, training, ensembles, tracking."""
