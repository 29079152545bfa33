"""Shared test oracles (independent restatements of the method and the formats) and helpers."""
