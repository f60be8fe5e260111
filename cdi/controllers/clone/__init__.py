"""Cloning a claim or a snapshot into a new claim: the strategy decision, then its phases."""
