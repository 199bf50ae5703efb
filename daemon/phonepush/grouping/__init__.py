"""Grouping: ``group_by``/``group_wait`` windows kept in the spool and flushed into one page per
phone (:mod:`.grouper`), which is also where silences and quiet hours are applied at intake.
"""
