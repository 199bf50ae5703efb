"""Silences and quiet hours: runtime silences with Alertmanager-style matchers (RE2), and the
compiled quiet hours of rules and phones (:mod:`.silences`).
"""
