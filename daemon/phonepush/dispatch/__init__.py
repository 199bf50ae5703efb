"""Delivering what the spool holds: per-phone workers, retries with backoff, TTL expiry,
``unconfirmed``, batched finishes and the outcomes published after each delivery
(:mod:`.dispatcher`). Pushes go through :class:`phonepush.phone.lanes.PhoneLanes`.
"""
