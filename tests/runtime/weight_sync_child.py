"""Consumers of ``ProcessTransport`` run in a real child process by tests/runtime/test_weight_sync.py."""

import time

from hotloop.runtime.weight_transport import serve


def copying_consumer(conn) -> None:
    """Copies every bucket into memory of its own (as an engine loading its weights would) and fingerprints the copy."""
    held = {}

    def load(version, index, bucket, plan):
        if index not in held:
            held[index] = bucket.clone()
        held[index].copy_(bucket)
        return held[index]

    serve(conn, load)


def silent_consumer(conn) -> None:
    """Receives the plan, then never answers a sync."""

    def load(version, index, bucket, plan):
        time.sleep(3600)

    serve(conn, load)


def failing_consumer(conn) -> None:
    """Fails on the second bucket of every sync."""

    def load(version, index, bucket, plan):
        if index == 1:
            raise ValueError(f"cannot load bucket {index} of plan with {len(plan.buckets)} buckets")
        return bucket

    serve(conn, load)
