from .clip_samerging import CLIPSAMergingAlgorithm
from .coefficients import FreeCoefficients, SAMergingCoefficients

__all__ = ["CLIPSAMergingAlgorithm", "FreeCoefficients", "SAMergingCoefficients"]
