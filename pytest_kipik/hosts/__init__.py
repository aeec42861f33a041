"""Hosts: where the Docker daemon that kind drives lives (local DinD container, DinD pod)."""
