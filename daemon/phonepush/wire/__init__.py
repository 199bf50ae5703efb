"""The Cisco objects on the wire: the CGI Execute URI grammar (:mod:`.uri`), the CiscoIPPhone XML
builders and the hardened parser of what phones answer (:mod:`.cisco`).

The bottom layer: it imports nothing of phonepush but the errors, so the CLI, the daemon and the
tests share one reading of the documents (the simulator keeps its own, in :mod:`phonepush.sim`).
"""
