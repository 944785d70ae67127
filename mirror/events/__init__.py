"""Events to other systems: `[[webhook]]` receivers told of pulls, fills, evictions, denials
and upstreams going down or up, in the registry's notification envelope.

    bus.py       Events: what the rest of the mirror calls (emit, never blocking a request),
                 a per-worker buffer flushed to the durable queues, the senders it runs
    envelope.py  pure: an event's fields, the envelope's bytes, the body's signature
    queue.py     EventQueue: one bounded, durable queue per webhook on disk (diskcache's
                 Deque; shared by the workers, it survives a restart)
    delivery.py  Sender: one worker at a time POSTs a webhook's queue in batches, removing
                 what the receiver acknowledged; retries with exponential backoff
"""
