"""Batch runs spread over replicas on a Ray cluster."""
