"""Phone health: probes, reachability, what each phone is (``monitor.py``)."""
