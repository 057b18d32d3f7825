"""The decision core: typed request context, the numbered phases, and their results."""
