"""Reconcilers for DataVolume and friends; they speak to storage only through cdi.backends."""
