"""The ``vp2o`` command line."""
