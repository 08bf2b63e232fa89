"""LANCET's Hydra configs and DeepSpeed JSON, installed as package data (see pyproject.toml)."""
