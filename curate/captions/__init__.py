"""Captions: generation backends, VeCap's rules, the caption cache."""
