"""S2T-Local: a candidate selector learned inside the SLM, so inference needs no LLM."""
