"""Simulated phones for tests, demos and benchmarks: the fleet and its control API
(:mod:`.simulator`), their HTTP side (:mod:`.http`) and the phone's own reading of Cisco's
documents (:mod:`.phone`), which imports nothing of the client's grammar or builders.
"""
