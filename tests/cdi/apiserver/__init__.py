"""Tests of the REST API server."""
