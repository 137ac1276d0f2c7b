"""The three small policies that make a decoding method: trigger × candidates × selector."""

from s2t.policies.candidates import CandidateSet, RatioFilter, TopK
from s2t.policies.selectors import (
    LLMSelector,
    RandomSelector,
    Selector,
    SLMSelector,
    StepContext,
    TakeoverSelector,
)
from s2t.policies.triggers import (
    AlwaysTrigger,
    EntropyTrigger,
    KLTrigger,
    MarginTrigger,
    NeverTrigger,
    RandomTrigger,
    Trigger,
)

__all__ = [
    "AlwaysTrigger",
    "CandidateSet",
    "EntropyTrigger",
    "KLTrigger",
    "LLMSelector",
    "MarginTrigger",
    "NeverTrigger",
    "RandomSelector",
    "RandomTrigger",
    "RatioFilter",
    "SLMSelector",
    "Selector",
    "StepContext",
    "TakeoverSelector",
    "TopK",
    "Trigger",
]
