"""Audit: one hash-chained JSON record per decision (see record.py, chain.py).

What a decision found on its way (inspection notes, response events, dry-run verdicts) is
gathered on the request's Trail and written once, with the decision, when the exchange ends.
Only counts, types, scores and codes go in: nothing a client sent verbatim, and no secret.
"""
