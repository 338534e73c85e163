from .clip_statsmerging import CLIPStatsMergingAlgorithm

__all__ = ["CLIPStatsMergingAlgorithm"]
