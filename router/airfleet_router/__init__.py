"""Airfleet router: sends OpenAI-compatible inference requests to the ready pods of the
requested model, found by watching pods labelled ``airfleet.io/endpoint`` in its namespace."""

__version__ = "0.1.0"
