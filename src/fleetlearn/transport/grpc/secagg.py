"""Secure aggregation over gRPC: the SecAgg messages on the wire and the server's stages.

The protocol is `fleetlearn.privacy.secagg`'s (Bonawitz et al., CCS 2017, with the SecAgg+
neighbour graph of Bell et al., CCS 2020, and the signed ConsistencyCheck round); this
module only moves its message objects between `fleetlearn server` and `fleetlearn client`:

    stage 0  advertise     client: AdvertiseKeys (c_pk, s_pk, Ed25519 vk)
                           server: its slice of the KeyDirectory + the client's public RowRecipe (its weight)
    stage 1  share_keys    client: ShareKeys (AES-GCM ciphertexts, relayed unread)
                           server: ForwardedShares (the ciphertexts addressed to it, U2)
    stage 2  masked_input  client: MaskedInput (y_u, dim x 4 or 8 bytes)
                           server: U3 (ConsistencyCheck request)
    stage 3  consistency   client: Ed25519 signature over (session, U3); SecAgg+: one to each
                           surviving neighbour, over their common neighbourhood's survivors
                           server: U3, U2 \\ U3 and the signatures it checks (unmask request)
    stage 4  unmask        client: UnmaskShares
                           server: done

Under SecAgg+ every server answer is the client's slice -- its own and its k neighbours'
keys, U2 / U3 among them, the signatures its neighbours addressed to it -- so a client
sends and receives O(k + d) bytes and does O(k d) work (all pairs: O(n + d), O(n d)).

Each stage is one `SecAggStep` call per client that the server holds until the stage
closes: every expected client sent its message (a client whose call was cut -- its
process died -- is no longer expected), or the stage's deadline passed (the round's
deadline, applied to each stage).  Clients that miss a stage drop out and are handled
by reconstruction; too few survivors fail the round (recorded, model unchanged).

`to_*` / `from_*` convert and *validate* (exact key, share, ciphertext and signature
sizes, bounded lists, distinct ids, the masked input's length and range), so a hostile
message is refused (`malformed`) before it reaches the protocol.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ...privacy.quantize import check_field
from ...privacy.secagg import (
    _SHARE_LEN,
    AdvertiseKeys,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    RowRecipe,
    SecAggError,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from . import fleetlearn_pb2 as pb
from .refusals import Refusal

FEATURE = "secagg"  # Capabilities.features: the client masks its own update (SecAggStep)
STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")
KEY_BYTES = 32
SIGNATURE_BYTES = 64
CIPHERTEXT_BYTES = 12 + 2 * _SHARE_LEN + 16  # nonce || AES-GCM(s_sk share || b share) || tag
DUMP_ENV = "FLEETLEARN_SECAGG_DUMP_DIR"  # testing aid: the server writes every update / SecAgg message it receives here


def word_bytes(modulus_bits: int) -> int:
    """Bytes per element of a masked input on the wire (little-endian)."""
    return 4 if modulus_bits <= 32 else 8


def _ids(values: Iterable[int], what: str, most: int) -> tuple[int, ...]:
    ids = tuple(int(v) for v in values)
    if len(ids) > most:
        raise Refusal("malformed", f"{what} lists {len(ids)} clients; at most {most}")
    if len(set(ids)) != len(ids):
        raise Refusal("malformed", f"{what} lists a client twice")
    return ids


def _blobs(items: Sequence[Any], what: str, size: int, most: int) -> dict[int, bytes]:
    if len(items) > most:
        raise Refusal("malformed", f"{what} has {len(items)} entries; at most {most}")
    out: dict[int, bytes] = {}
    for b in items:
        if len(b.data) != size:
            raise Refusal("malformed", f"{what}: entry for client {b.client_id} has {len(b.data)} bytes; expected {size}")
        if b.client_id in out:
            raise Refusal("malformed", f"{what} has two entries for client {b.client_id}")
        out[int(b.client_id)] = bytes(b.data)
    return out


def _blob_list(items: Mapping[int, bytes]) -> list[pb.SecAggBlob]:
    return [pb.SecAggBlob(client_id=int(k), data=v) for k, v in sorted(items.items())]


# -- client -> server ------------------------------------------------------------------------
def advertise_from_pb(cid: int, m: pb.SecAggAdvertiseKeys) -> AdvertiseKeys:
    for name in ("cipher_public_key", "mask_public_key", "signing_public_key"):
        if len(getattr(m, name)) != KEY_BYTES:
            raise Refusal("malformed", f"SecAggAdvertiseKeys.{name} has {len(getattr(m, name))} bytes; expected {KEY_BYTES}")
    if len({m.cipher_public_key, m.mask_public_key, m.signing_public_key}) != 3:
        raise Refusal("malformed", "SecAggAdvertiseKeys repeats a public key")
    return AdvertiseKeys(cid, bytes(m.cipher_public_key), bytes(m.mask_public_key), bytes(m.signing_public_key))


def advertise_to_pb(m: AdvertiseKeys) -> pb.SecAggAdvertiseKeys:
    return pb.SecAggAdvertiseKeys(cipher_public_key=m.cipher_public_key, mask_public_key=m.mask_public_key,
                                  signing_public_key=m.signing_public_key)


def share_keys_from_pb(cid: int, m: pb.SecAggShareKeys, neighbors: Sequence[int]) -> ShareKeys:
    boxes = _blobs(m.encrypted_shares, "SecAggShareKeys.encrypted_shares", CIPHERTEXT_BYTES, len(neighbors))
    if set(boxes) != set(neighbors):
        raise Refusal("malformed", f"SecAggShareKeys from client {cid} addresses clients {sorted(boxes)}; its neighbours are {sorted(neighbors)}")
    if len(m.self_mask_commitment) != 32:
        raise Refusal("malformed", f"SecAggShareKeys.self_mask_commitment has {len(m.self_mask_commitment)} bytes; expected 32")
    return ShareKeys(cid, boxes, bytes(m.self_mask_commitment))


def share_keys_to_pb(m: ShareKeys) -> pb.SecAggShareKeys:
    return pb.SecAggShareKeys(encrypted_shares=_blob_list(m.encrypted_shares), self_mask_commitment=m.self_mask_commitment)


def masked_from_pb(cid: int, m: pb.SecAggMaskedInput, dim: int, modulus_bits: int) -> MaskedInput:
    w = word_bytes(modulus_bits)
    if len(m.masked) != dim * w:
        raise Refusal("malformed", f"SecAggMaskedInput.masked has {len(m.masked)} bytes; a row of {dim} elements of "
                                   f"Z_2^{modulus_bits} has {dim * w}")
    vec = np.frombuffer(m.masked, dtype="<u4" if w == 4 else "<u8").astype(np.uint64)
    try:
        vec = check_field(vec, modulus_bits)
    except ValueError as exc:
        raise Refusal("malformed", f"SecAggMaskedInput.masked: {exc}") from None
    return MaskedInput(cid, vec, modulus_bits)


def masked_to_pb(m: MaskedInput) -> pb.SecAggMaskedInput:
    w = word_bytes(m.modulus_bits)
    return pb.SecAggMaskedInput(masked=m.masked.astype("<u4" if w == 4 else "<u8").tobytes())


def signature_from_pb(cid: int, m: pb.SecAggSignature, neighbors: Sequence[int] | None) -> ConsistencySignature:
    """`neighbors`: None in an all-pairs round (one signature over U3); under SecAgg+ the
    client's surviving neighbours, each of which it must sign to, and no one else."""
    if neighbors is None:
        if len(m.signature) != SIGNATURE_BYTES:
            raise Refusal("malformed", f"SecAggSignature.signature has {len(m.signature)} bytes; expected {SIGNATURE_BYTES}")
        if len(m.neighbor_signatures):
            raise Refusal("malformed", "SecAggSignature.neighbor_signatures in an all-pairs round (one signature over U3 is expected)")
        return ConsistencySignature(cid, bytes(m.signature))
    if m.signature:
        raise Refusal("malformed", "SecAggSignature.signature in a SecAgg+ round (sign to each surviving neighbour: neighbor_signatures)")
    sigs = _blobs(m.neighbor_signatures, "SecAggSignature.neighbor_signatures", SIGNATURE_BYTES, len(neighbors))
    if set(sigs) != set(neighbors):
        raise Refusal("malformed", f"SecAggSignature from client {cid} signs to clients {sorted(sigs)}; its surviving neighbours are {sorted(neighbors)}")
    return ConsistencySignature(cid, b"", sigs)


def signature_to_pb(m: ConsistencySignature) -> pb.SecAggSignature:
    return pb.SecAggSignature(signature=m.signature, neighbor_signatures=_blob_list(m.neighbor_signatures))


def unmask_from_pb(cid: int, m: pb.SecAggUnmaskShares, survivors: Sequence[int], dropped: Sequence[int]) -> UnmaskShares:
    """`survivors`, `dropped`: what this client was told (its slice under SecAgg+)."""
    most = len(survivors) + len(dropped)
    own = _blobs(m.self_mask_shares, "SecAggUnmaskShares.self_mask_shares", _SHARE_LEN, most)
    keys = _blobs(m.mask_key_shares, "SecAggUnmaskShares.mask_key_shares", _SHARE_LEN, most)
    if not set(own) <= set(survivors) or not set(keys) <= set(dropped):
        raise Refusal("malformed", f"SecAggUnmaskShares from client {cid}: self-mask shares only for survivors (U3), "
                                   "mask-key shares only for dropped clients (U2 \\ U3)")
    return UnmaskShares(cid, own, keys)


def unmask_to_pb(m: UnmaskShares) -> pb.SecAggUnmaskShares:
    return pb.SecAggUnmaskShares(self_mask_shares=_blob_list(m.self_mask_shares), mask_key_shares=_blob_list(m.mask_key_shares))


# -- server -> client ------------------------------------------------------------------------
def recipe_to_pb(recipe: RowRecipe, weight: float, secure) -> pb.SecAggRecipe:
    q = secure.quantizer
    return pb.SecAggRecipe(weight=float(weight), clip_norm=recipe.clip_norm, scale=recipe.scale, indicator_norm=recipe.indicator_norm,
                           clip_range=q.clip_range, max_clients=q.max_clients, rounding=q.rounding)


def directory_to_pb(d: KeyDirectory, recipe: pb.SecAggRecipe) -> pb.SecAggKeyDirectory:
    """A client's slice of the key directory (`SecAggServer.directory_for`), without the graph:
    the client derives its neighbours from the points, `size`, `degree` and the session.
    All pairs: O(n) bytes; SecAgg+: O(k)."""
    peers = [pb.SecAggPeerKeys(client_id=c, cipher_public_key=d.keys[c][0], mask_public_key=d.keys[c][1],
                               signing_public_key=d.signing_keys.get(c, b""), point=d.points[c]) for c in sorted(d.keys)]
    return pb.SecAggKeyDirectory(session=d.session, threshold=d.threshold, modulus_bits=d.modulus_bits, dim=d.dim, peers=peers,
                                 recipe=recipe, degree=int(d.degree or 0), size=d.size)


def directory_from_pb(m: pb.SecAggKeyDirectory, max_dim: int) -> KeyDirectory:
    """The client's check of what the server sent (a server is not trusted with sizes either):
    at most the clients it needs (all of U1, or itself and its `degree` neighbours).  Its
    neighbours are derived, and checked against these peers, in `SecAggClient.share_keys`."""
    if not (1 <= m.dim <= max_dim) or not (8 <= m.modulus_bits <= 62) or len(m.session) != 16:
        raise SecAggError(f"key directory with dim {m.dim}, modulus_bits {m.modulus_bits}, session of {len(m.session)} bytes")
    if m.size < 3 or (m.degree and m.degree >= m.size - 1):
        raise SecAggError(f"key directory of a round of {m.size} clients with graph degree {m.degree}: "
                          "at least 3 clients, and a degree below size - 1 (0: all pairs)")
    most = m.size if not m.degree else m.degree + 1
    if len(m.peers) > most:
        raise SecAggError(f"the key directory lists {len(m.peers)} clients; a client of a round of {m.size} "
                          f"{'(all pairs)' if not m.degree else f'with graph degree {m.degree}'} needs at most {most}")
    keys, signing, points = {}, {}, {}
    for p in m.peers:
        keys[int(p.client_id)] = (bytes(p.cipher_public_key), bytes(p.mask_public_key))
        signing[int(p.client_id)] = bytes(p.signing_public_key)
        points[int(p.client_id)] = int(p.point)
    if len(keys) != len(m.peers):
        raise SecAggError("the key directory lists a client twice")
    return KeyDirectory(bytes(m.session), int(m.threshold), int(m.modulus_bits), int(m.dim), keys, {}, signing, points, int(m.size),
                        int(m.degree) or None)


def forwarded_to_pb(f: ForwardedShares) -> pb.SecAggForwardedShares:
    return pb.SecAggForwardedShares(encrypted_shares=_blob_list(f.encrypted_shares), participants=list(f.participants))


def forwarded_from_pb(cid: int, m: pb.SecAggForwardedShares) -> ForwardedShares:
    return ForwardedShares(cid, {int(b.client_id): bytes(b.data) for b in m.encrypted_shares}, tuple(int(u) for u in m.participants))


def survivors_to_pb(r: UnmaskRequest) -> pb.SecAggSurvivors:
    return pb.SecAggSurvivors(survivors=list(r.survivors), dropped=list(r.dropped))


def survivors_from_pb(m: pb.SecAggSurvivors) -> UnmaskRequest:
    return UnmaskRequest(tuple(int(u) for u in m.survivors), tuple(int(u) for u in m.dropped))


# -- the server's stages ---------------------------------------------------------------------------
@dataclass
class Stage:
    """One SecAgg stage on the server: who is expected, what arrived, when it closes."""

    name: str
    expected: set[int]
    deadline: float  # time.monotonic()
    received: dict[int, Any] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)  # expected clients whose call was cut or refused
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # replies computed (or the round failed)
    replies: dict[int, Any] = field(default_factory=dict)  # client -> the pb reply message, once closed
    started: float = field(default_factory=time.monotonic)

    def complete(self) -> bool:
        return self.expected <= set(self.received) | self.gone


@dataclass
class SecAggRound:
    """The server side of one round's secure aggregation (lives on the server's loop)."""

    round: int
    clients: tuple[int, ...]
    weights: dict[int, float]
    recipe: RowRecipe
    secure: Any  # the run's SecureAggregation (quantizer, threshold, neighbours)
    dim: int
    stage_s: float
    protocol: SecAggServer
    stage: Stage | None = None
    index: int = -1
    failed: str = ""
    done: bool = False
    lost: set[int] = field(default_factory=set)  # clients gone for the rest of the round (cut calls, no heartbeat, garbage)
    uplink: dict[int, int] = field(default_factory=dict)  # SecAgg bytes each client sent
    downlink: dict[int, int] = field(default_factory=dict)  # ... and received
    stage_bytes: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def count(self, client: int, up: int = 0, down: int = 0, stage: str = "") -> None:
        self.uplink[client] = self.uplink.get(client, 0) + up
        self.downlink[client] = self.downlink.get(client, 0) + down
        if stage:
            self.stage_bytes[stage] = self.stage_bytes.get(stage, 0) + up + down

    def measurements(self) -> dict[str, Any]:
        return {
            "secagg_clients": len(self.clients),
            "secagg_uplink_bytes": sum(self.uplink.values()),
            "secagg_downlink_bytes": sum(self.downlink.values()),
            "secagg_stage_bytes": dict(self.stage_bytes),
            "secagg_stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
        }


def dump_dir() -> Path | None:
    """Where the server dumps what it receives (the `FLEETLEARN_SECAGG_DUMP_DIR` testing aid), or None."""
    d = os.environ.get(DUMP_ENV)
    if not d:
        return None
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def dump(kind: str, round: int, client: int, data: bytes) -> None:
    d = dump_dir()
    if d is not None:
        (d / f"r{round}-{kind}-c{client}-{time.monotonic_ns()}.bin").write_bytes(data)


# -- the client's side ----------------------------------------------------------------------------
EXIT_ENV = "FLEETLEARN_SECAGG_EXIT"  # testing aid (fault injection): "ROUND:STAGE" -> the client process exits
#                                      right after sending its message of that stage in that round
INPUT_DUMP_ENV = "FLEETLEARN_SECAGG_INPUT_DUMP_DIR"  # testing aid: the client writes its quantized row here


def exit_stage(round: int) -> str | None:
    """The stage after which this process should exit in `round` (`FLEETLEARN_SECAGG_EXIT`), if any."""
    spec = os.environ.get(EXIT_ENV, "")
    r, _, stage = spec.partition(":")
    if r.strip().isdigit() and int(r) == int(round) and stage in STAGES:
        return stage
    return None


async def take_part(client_id: int, round: int, update, step, max_dim: int) -> dict[str, float]:
    """One client's side of a round's secure aggregation: `update` is its (d,) outgoing update
    (held on the device), `step(kind, pb_message)` sends one SecAggStep and returns the reply.
    The row it masks is `recipe.row(update, weight)` quantized with the run's quantizer
    (`privacy.quantize.Quantizer`, as in the simulation).  Returns what it cost: |U3|, the
    seconds it computed (key agreements, shares, masks: `compute_s` in wall time, `cpu_s` in
    its thread's CPU time, which other processes' load does not inflate), the bytes it sent
    and received.
    Raises SecAggError when the server's messages are inconsistent (the client then reveals
    nothing more)."""
    from ...privacy.quantize import Quantizer
    from ...privacy.secagg import SecAggClient

    cost = {"survivors": 0, "compute_s": 0.0, "cpu_s": 0.0, "uplink_bytes": 0, "downlink_bytes": 0}
    # Between two awaits only this client's work runs on the loop's thread: its thread time is its CPU.
    clock = [time.perf_counter(), time.thread_time()]

    def tick() -> None:
        cost["compute_s"] += time.perf_counter() - clock[0]
        cost["cpu_s"] += time.thread_time() - clock[1]

    async def send(kind: str, body) -> Any:
        tick()
        cost["uplink_bytes"] += body.ByteSize()
        reply = await step(kind, body)
        cost["downlink_bytes"] += reply.ByteSize()
        clock[:] = [time.perf_counter(), time.thread_time()]
        return reply

    me = SecAggClient(client_id, consistency=True)
    reply = await send("advertise", advertise_to_pb(me.advertise_keys()))
    if reply.WhichOneof("body") != "directory":
        raise SecAggError(f"expected the key directory, got {reply.WhichOneof('body')}")
    directory = directory_from_pb(reply.directory, max_dim)
    rc = reply.directory.recipe
    recipe = RowRecipe(rc.clip_norm, rc.scale, rc.indicator_norm)
    if recipe.width(len(update)) != directory.dim or not (np.isfinite(rc.weight) and 0 <= rc.weight <= 1):
        raise SecAggError(f"the round's row has {directory.dim} elements and weight {rc.weight}; this client's update has {len(update)}")
    reply = await send("share_keys", share_keys_to_pb(me.share_keys(directory)))
    forwarded = forwarded_from_pb(client_id, reply.forwarded)
    quantizer = Quantizer(rc.clip_range, int(rc.max_clients), directory.modulus_bits, rc.rounding or "stochastic")
    row = quantizer.quantize(recipe.row(update, rc.weight))
    d = os.environ.get(INPUT_DUMP_ENV)
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        np.save(Path(d) / f"r{round}-c{client_id}.npy", row)
    reply = await send("masked_input", masked_to_pb(me.masked_input(forwarded, row)))
    request = survivors_from_pb(reply.consistency_request)
    reply = await send("consistency", signature_to_pb(me.consistency_check(request)))
    unmask = reply.unmask_request
    request = survivors_from_pb(unmask.survivors)
    signatures = {int(b.client_id): bytes(b.data) for b in unmask.signatures}
    reply = await send("unmask", unmask_to_pb(me.unmask(request, signatures)))
    tick()
    cost["survivors"] = int(reply.done.survivors)
    return cost
