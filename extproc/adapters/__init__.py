"""Thin translations between Envoy's protobuf APIs and the decision core."""
