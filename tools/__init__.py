"""Maintenance scripts (rebuilding bundled assets); not imported by training code."""
