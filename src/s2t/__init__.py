"""select-to-think: SLMs that select among their own top-K next-token candidates (S2T)."""

from s2t.api import GenerationOutput, ResolvedMethod, S2TGenerator
from s2t.engine import CostRecord, Generation, Method, decode
from s2t.methods import CalibrationSource, MethodSpec, build_method, calibrate

__all__ = [
    "CalibrationSource",
    "CostRecord",
    "Generation",
    "GenerationOutput",
    "Method",
    "MethodSpec",
    "ResolvedMethod",
    "S2TGenerator",
    "build_method",
    "calibrate",
    "decode",
]
__version__ = "0.1.0"
