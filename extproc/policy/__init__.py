"""Policies: what model owners write (schema), its frozen runtime form (compile), and the store."""
