"""The names of the decoding methods and triggers: the one list every entry point accepts.

Kept free of imports so that the command line can list them in ``--help`` without loading
torch. :mod:`s2t.methods` builds methods from these names; a test pins that the trigger names
are those of :mod:`s2t.policies.triggers` plus the learned one.
"""

# method name -> selector name; "greedy" never triggers
METHOD_SELECTORS = {"greedy": "slm", "s2t": "llm", "takeover": "takeover", "random-select": "random"}
LLM_ALONE = "llm"  # decoding with the LLM alone (a baseline, not an S2T method)
LOCAL_METHOD = "s2t-local"  # the learned selector inside the SLM; needs no LLM
# Every decoding method; `s2t eval` also accepts maj@K and labelled variants METHOD:LABEL of the methods
# that read --selector (s2t-local:lora, s2t:hidden/learned).
METHODS = (*METHOD_SELECTORS, LLM_ALONE, LOCAL_METHOD)
# Triggers: the built-in ones (s2t.policies.triggers.TRIGGERS) and the learned one stored with a selector.
TRIGGER_NAMES = ("never", "always", "entropy", "margin", "kl", "random", "learned")
