"""Talking to one phone: the client (:mod:`.client`: a ``PhoneTarget`` and its ``PhoneClient``,
transport errors turned into phone errors), the lean HTTP/1.1 connection under it
(:mod:`.http11`), and the lanes (:mod:`.lanes`) that give every phone one push at a time and
bound the open connections.
"""
