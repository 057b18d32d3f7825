"""Demo model pods: small real HTTP servers that stand in for model endpoints behind Envoy."""
