"""Transforms: plain functions that turn a model and a plan into a compressed model."""
