"""Shared code of the imagetraining services: stubs, settings, errors, database, conversions."""
