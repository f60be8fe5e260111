"""Tests of the `cdi` command-line client, run as a user runs it."""
