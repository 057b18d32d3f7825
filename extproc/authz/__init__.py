"""Authorization: every applicable rule must pass."""
