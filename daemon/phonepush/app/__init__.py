"""The daemon as a process: its lifespan (:mod:`.daemon`: resources in order, one TaskGroup,
signals, reload, shutdown), systemd notifications and credentials (:mod:`.systemd`) and the
open-files limit (:mod:`.limits`).
"""
