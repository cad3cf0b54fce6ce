"""Deployments of v2k (prefect.yaml) and `v2k serve`, which runs them on one machine."""
