"""S2T-Local training: collecting groups from SLM + LLM, packing them, the objectives and the trainers.

Nothing here is imported by decoding: what decoding loads lives in :mod:`s2t.policies`.
"""
