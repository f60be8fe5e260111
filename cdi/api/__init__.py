"""Typed CDI API objects, validation and defaulting rules (the control plane lands with issue 3)."""
