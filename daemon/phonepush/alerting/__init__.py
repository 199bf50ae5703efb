"""Alerts: pages that are acknowledged, repeated, escalated and resolved. :mod:`.acks` plans
an alert at intake and serves the phones' Ack; :mod:`.repeats` pushes the rounds until then.
"""
