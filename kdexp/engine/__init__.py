"""Training engine: the run plan, assembly, the one fit loop with its steppers and data sources,
evaluation, the teacher provider + cache, the run recorder."""
