"""The watch that brings this server its nudges from etcd.

Every server watches its own key, ``<prefix>nudge/<server id>``; a server
that grants one of its waiters puts there, in the transaction that writes
the grant, the pool's name and record, so the waiter is answered from the
record the watch brings (no read). A broken watch is made again, on the
next member, from the last revision seen, so no nudge is missed; if that
revision was compacted, the layer is told to check every pool it waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, Callable
from typing import Any

from distributex.backends.etcd_members import (
    AUTH_RETRY,
    EtcdError,
    EtcdMembers,
    Member,
    grpc,
    host,
    log,
    reason,
    rpc,
)
from distributex.backends.record import split_nudge
from distributex.backends.store import Stored

WATCH_BACKOFF_MAX = 1.0
WATCH_CREATE_TIMEOUT = 2.0


async def watch_nudges(cluster: EtcdMembers, key: bytes, nudged: Callable[..., None]) -> None:
    """Run until cancelled: ``nudged(pool, stored)`` for each nudge put under ``key``.

    ``nudged(None)`` after every (re)made watch: nudges may have been missed.
    """
    revision: int | None = None  # the last revision seen: a new watch goes on from it
    index = cluster.current
    delay = 0.05
    failed = False
    while True:
        member = cluster.open()[index % len(cluster.endpoints)]
        where = host(cluster.endpoints[index % len(cluster.endpoints)])
        start = 0 if revision is None else revision + 1
        try:
            async with contextlib.aclosing(_watch(cluster, member, key, start)) as results:
                async for result in results:
                    # Before ``created``: etcd refuses a watch with created and canceled.
                    if result.canceled:
                        if result.compact_revision:
                            log.info(
                                "etcd watch: revision %s was compacted: checking every pool",
                                revision,
                            )
                            revision = None  # a full check follows the new watch
                        why = result.cancel_reason or "watch cancelled"
                        if "auth" in why or "permission" in why:
                            cluster.token = None  # (a token that ended: ask for another)
                        raise EtcdError(None, why)
                    if result.created:
                        if revision is None and result.header.revision:
                            revision = result.header.revision
                        if failed:
                            log.info("etcd watch at %s works again", where)
                            failed = False
                        delay = 0.05
                        nudged(None)  # nudges may have been missed: check every pool
                        continue
                    for event in result.events:
                        kv = event.kv
                        revision = max(revision or 0, kv.mod_revision)
                        if event.type != rpc.Event.DELETE:
                            pool, record = split_nudge(kv.value)
                            stored = None if record is None else Stored(record, kv.mod_revision)
                            nudged(pool, stored)
            raise EtcdError(None, "watch stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: watch again, from another member
            if not failed:
                log.warning("etcd watch at %s broke: %s", where, reason(exc))
            failed = True
        index += 1
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(WATCH_BACKOFF_MAX, delay * 2)


async def _watch(
    cluster: EtcdMembers, member: Member, key: bytes, start: int
) -> AsyncGenerator[Any, None]:
    """The answers of one watch stream on ``key`` from revision ``start``, as they come.

    Made within WATCH_CREATE_TIMEOUT (a member that drops packets would
    hold it for gRPC's 20 s connect timeout); then as long as it lasts.
    """
    stream = None
    try:
        async with asyncio.timeout(WATCH_CREATE_TIMEOUT):
            if cluster.user is not None and cluster.token is None:
                await cluster.authenticate(member)
            stream = member.watch.Watch(metadata=cluster.metadata())
            create = rpc.WatchCreateRequest(key=key, start_revision=start)
            await stream.write(rpc.WatchRequest(create_request=create))
            answer = await stream.read()
        while answer is not grpc.aio.EOF:
            yield answer
            answer = await stream.read()
    except TimeoutError:
        # etcd 3.4 answers a watch with a token it no longer knows with silence:
        # the next try asks for a new one.
        if cluster.user is not None:
            cluster.token = None
        raise EtcdError(None, "timed out") from None
    except grpc.aio.AioRpcError as exc:
        if (exc.details() or "") in AUTH_RETRY:
            cluster.token = None
        raise EtcdError(exc.code(), exc.details() or str(exc.code())) from None
    finally:
        if stream is not None:
            stream.cancel()
