"""Hosts: where the Docker daemon that kind drives lives, behind one seam (:mod:`.base`).

:mod:`.docker` (a DinD container on the local engine) and :mod:`.pod` (a DinD pod in the
:mod:`.outer` cluster) implement it; :mod:`.choice` picks one; :mod:`.engine` talks to the
local Docker engine for both; :mod:`.transfer` finds and builds images to move into a host;
:mod:`.pod_manifest` builds the DinD pod.
"""
