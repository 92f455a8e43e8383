"""Launch-time helpers shared by ``vp2o train`` and the cluster launchers (signals -> checkpoint)."""
