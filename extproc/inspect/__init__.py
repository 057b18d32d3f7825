"""The inspect and respond phases: what may go into a model, and what may come out of it."""
