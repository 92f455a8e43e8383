"""Distributed glue: process-group start-up and (later) reductions and optimizer hooks."""
