"""Stores: where jobs live. Only this package knows SQL."""
