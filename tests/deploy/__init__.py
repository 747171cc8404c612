"""Tests of the deploy/ artifacts: images, compose, Kubernetes, dashboards and the capacity model."""
