"""Simulated hospital federations on one machine: partitioners, protocols, reports."""
