"""The ``run`` pipeline: the one place that sequences export, profile, bench and eval over the
registry, remembers what it did (the run manifest) and writes their results records.
"""
