"""Reasoning data: the one SPEC grammar and its loaders (training and bench), chat rendering,
thinking spans and answer grading."""
