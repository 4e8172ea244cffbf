"""Toy-scale reproductions of the offline → semi-online → online spectrum (issue 6)."""
