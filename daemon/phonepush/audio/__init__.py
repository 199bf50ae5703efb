"""Audio paging: files and speech as G.711 µ-law (:mod:`.clips`), the paced RTP sender and the
checking receiver (:mod:`.rtp`), a one-off page to many phones (:mod:`.paging`, shared with
``phonepush page``) and rules' audio pages in the daemon (:mod:`.announce`).
"""
