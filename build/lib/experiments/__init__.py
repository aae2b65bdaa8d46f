"""Experiments: data, models, training and the pipeline that ties them (no heavy imports here)."""
