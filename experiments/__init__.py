"""Experiments that reproduce vanishing, exploding and initialisation effects, plus the overhead benchmark."""
