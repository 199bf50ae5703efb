"""The daemon's HTTP side (Starlette on uvicorn): the app, its protocol and webhooks
(:mod:`.server`), the state the routes share (:mod:`.state`), the status and ack routes
(:mod:`.api`), runtime silences (:mod:`.silences_api`) and the phones' authentication URL
(:mod:`.authenticate`).
"""
