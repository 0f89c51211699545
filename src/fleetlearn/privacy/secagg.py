"""Secure aggregation with dropout recovery (Bonawitz, Ivanov, Kreuter,
Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017: its rounds
AdvertiseKeys, ShareKeys, MaskedInputCollection and Unmasking -- the
honest-but-curious server variant; with ``consistency=True`` also the signed
ConsistencyCheck round of the actively-malicious variant), with the optional sparse neighbour graph of SecAgg+ (Bell, Bonawitz,
Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020).

The protocol is four rounds of explicit messages between `SecAggClient`
objects and a `SecAggServer`, so the same flow runs in the simulation (see
`secure_sum`) and over gRPC (`fleetlearn.transport.grpc.secagg`, where each client
masks its own row and the server only relays and unmasks):

    0. AdvertiseKeys   client -> server: two X25519 public keys, c_pk (encrypting
                       shares) and s_pk (pairwise masks).       -> KeyDirectory
    1. ShareKeys       client u -> server: for each neighbour v, AES-GCM
                       encrypted Shamir shares of s_sk_u and of its self-mask
                       seed b_u, keyed by HKDF(X25519(c_sk_u, c_pk_v)); the
                       server relays them and cannot read them.  -> ForwardedShares
    2. MaskedInput     client u -> server:
                         y_u = x_u + PRG(b_u) + sum_{v in N(u), u < v} PRG(s_uv)
                                            - sum_{v in N(u), u > v} PRG(s_uv)  (mod 2^k)
                       with s_uv = HKDF(X25519(s_sk_u, s_pk_v)).   -> UnmaskRequest
    3. UnmaskShares    every survivor v sends, for each survivor u, its share of
                       b_u, and for each client u that dropped after round 1,
                       its share of s_sk_u -- never both for the same u.
                       The server reconstructs from t shares, removes the
                       self masks of survivors and the dangling pairwise masks
                       of dropped clients, and obtains sum_{u survived} x_u.

With ``consistency=True`` (the gRPC transport), each client also advertises an
Ed25519 verification key in round 0, and a ConsistencyCheck round runs between
2 and 3: the server sends U3 to the survivors, each signs (session, U3) and the
server relays the signatures of U4 (those that signed) with the unmask request;
a client reveals shares only after verifying at least t valid signatures over
the same U3 it signed -- so a server cannot show different clients different
survivor sets to learn both secrets of one client.

Under SecAgg+ every answer of the server is the recipient's slice (Bell et al. 2020):
the key directory holds its own and its k neighbours' keys and share points, U2 and
U3 are given among its neighbourhood, and the graph is never sent -- each party
derives its neighbours from its share point, |U1|, k and the session (`_Ring`: a
keyed permutation evaluated pointwise, O(1) per place).  The ConsistencyCheck is
local: a survivor signs, to each surviving neighbour w, the survivors among the
clients that neighbour both of them (`pair_consistency_message`), and before
unmasking checks at least t such signatures addressed to it against its own view.
A client's secrets are shared among its neighbours only, so what must not be
split is each neighbourhood's view of who survived: two neighbours told different
things about a common neighbour u do not verify each other's signature.

The server only ever holds masked vectors, ciphertexts it cannot open, the
shares it is entitled to, and the final sum.  Fewer than t live share holders
for any client needed for unmasking makes the round fail with
`SecAggDropoutError`; a share that fails AES-GCM authentication raises
`SecAggTamperError` on the receiving client; a reconstructed secret that does
not match what its owner committed to (s_pk, or SHA-256(b_u)) raises
`SecAggError` on the server.

PRG: AES-256-CTR keystream (`cryptography`), expanded to the whole vector in
one call -- vectorised and cryptographically sound -- and read as k-bit ring
elements.  Keys: HKDF-SHA256 with the round's random session id as salt, so
masks never repeat across rounds.

Threat model and cost.  Security holds against an honest-but-curious server
and fewer than t colluding clients (t > n/2 by default).  An actively malicious
server that lies about who dropped is caught by the signed ConsistencyCheck round
(``consistency=True``); the verification keys are trusted as advertised (no PKI
binds them to client identities beyond the transport's authenticated tokens), and so
is the server's assignment of share points (which places clients on the ring).
Cost per round: all pairs, each client does O(n) key agreements and mask expansions
(O(n d) work) and sends and receives O(n + d) bytes, the server O(n^2) key agreements
/ Shamir reconstructions in the worst case of many dropouts.  SecAgg+'s k-regular
graph (`neighbors=k`, k ~ O(log n)) makes it O(k) key agreements, signatures and
verifications, O(k d) mask expansion and O(k + d) bytes per client, and O(n k)
besides the sum on the server.

Randomness: by default everything secret comes from `os.urandom`.  Passing a
seeded numpy Generator makes a simulation reproducible and is NOT secure.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .quantize import Quantizer, check_field, check_modulus_bits, field_mask
from .shamir import ShamirError, combine_shares, share_from_bytes, share_nbytes, share_to_bytes, split_secret

SECRET_BYTES = 32
_SHARE_LEN = share_nbytes(SECRET_BYTES)
_ID = 8  # client ids travel as 8-byte big-endian integers


class SecAggError(RuntimeError):
    """The secure aggregation round cannot complete; the message says why."""


class SecAggDropoutError(SecAggError):
    """Too many clients dropped: fewer than `threshold` live share holders."""


class SecAggTamperError(SecAggError):
    """A relayed ciphertext failed authentication (modified, swapped or replayed)."""


# -- messages ----------------------------------------------------------------------------
def _pub(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client -> server (Bonawitz et al. 2017, round 'AdvertiseKeys')."""

    client_id: int
    cipher_public_key: bytes  # c_pk: encrypts the shares sent to this client
    mask_public_key: bytes  # s_pk: pairwise mask agreement
    signing_public_key: bytes = b""  # Ed25519 verification key (ConsistencyCheck); b"": none

    @property
    def nbytes(self) -> int:
        return _ID + len(self.cipher_public_key) + len(self.mask_public_key) + len(self.signing_public_key)


@dataclass(frozen=True)
class KeyDirectory:
    """Server -> client: the public keys the client needs, the threshold, and the public
    numbers every party derives the neighbour graph from.

    The server holds the whole directory (all of U1).  A client receives its slice
    (`slice`): under all pairs the whole directory; under SecAgg+ only its own and its k
    neighbours' keys, O(k) bytes.  No neighbour list travels: the graph follows from the
    session, `size` (|U1|), `degree` and each client's share point (`neighbor_graph`,
    `derive_neighborhood`), so a client checks what it was sent against what it derives."""

    session: bytes
    threshold: int
    modulus_bits: int
    dim: int
    keys: Mapping[int, tuple[bytes, bytes]]  # client -> (c_pk, s_pk)
    neighbors: Mapping[int, tuple[int, ...]]  # the server's: everyone's; a client's slice: its own
    signing_keys: Mapping[int, bytes] = field(default_factory=dict)  # ConsistencyCheck: client -> Ed25519 key
    points: Mapping[int, int] = field(default_factory=dict)  # client -> its Shamir point: its 1-based rank in U1
    size: int = 0  # |U1|
    degree: int | None = None  # SecAgg+ graph degree k; None: all pairs
    positions: Mapping[int, int] = field(default_factory=dict)  # SecAgg+: client -> its place on the ring

    def share_point(self, client_id: int) -> int:
        """The Shamir evaluation point of a client: its 1-based rank in U1."""
        return self.points[client_id]

    def slice(self, client_id: int) -> KeyDirectory:
        """What `client_id` receives: under all pairs the whole directory (it needs every key);
        under SecAgg+ its own and its neighbours' keys, points and places only."""
        if self.degree is None:
            return self
        near = (client_id, *self.neighbors[client_id])
        return replace(self, keys={c: self.keys[c] for c in near}, neighbors={client_id: self.neighbors[client_id]},
                       signing_keys={c: self.signing_keys[c] for c in near if c in self.signing_keys},
                       points={c: self.points[c] for c in near}, positions={c: self.positions[c] for c in near})

    @property
    def nbytes(self) -> int:
        return 16 + 4 * 4 + sum(_ID + 4 + len(a) + len(b) + len(self.signing_keys.get(c, b"")) for c, (a, b) in self.keys.items())


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client -> server: shares of s_sk_u and b_u for each neighbour,
    each encrypted to that neighbour (nonce || AES-GCM ciphertext), and a
    SHA-256 commitment to b_u so a wrong reconstruction is detected."""

    client_id: int
    encrypted_shares: Mapping[int, bytes]  # recipient -> ciphertext
    self_mask_commitment: bytes

    @property
    def nbytes(self) -> int:
        return _ID + len(self.self_mask_commitment) + sum(_ID + len(c) for c in self.encrypted_shares.values())


@dataclass(frozen=True)
class ForwardedShares:
    """Server -> client v: the ciphertexts addressed to v, and U2 (the clients
    that completed round 1: v masks with its neighbours among them)."""

    recipient: int
    encrypted_shares: Mapping[int, bytes]  # sender -> ciphertext
    participants: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _ID + sum(_ID + len(c) for c in self.encrypted_shares.values()) + _ID * len(self.participants)


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client -> server: y_u in Z_{2^k}^d (uint64 storage)."""

    client_id: int
    masked: np.ndarray
    modulus_bits: int

    @property
    def nbytes(self) -> int:
        return _ID + self.masked.size * -(-self.modulus_bits // 8)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> survivors: U3 (sent a masked input) and U2 \\ U3 (dropped)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _ID * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class ConsistencySignature:
    """ConsistencyCheck, client -> server.  All pairs: one Ed25519 signature over (session, U3).
    SecAgg+: one per surviving neighbour v, over the survivors among the clients that neighbour
    both (`pair_consistency_message`), addressed to v (`neighbor_signatures`)."""

    client_id: int
    signature: bytes
    neighbor_signatures: Mapping[int, bytes] = field(default_factory=dict)  # SecAgg+: recipient -> signature

    @property
    def nbytes(self) -> int:
        return _ID + len(self.signature) + sum(_ID + len(s) for s in self.neighbor_signatures.values())


def consistency_message(session: bytes, survivors: Iterable[int], pair: tuple[int, int] | None = None) -> bytes:
    """What a client signs in the ConsistencyCheck round: the session and U3 (all pairs), or
    under SecAgg+ (`pair` = (signer, recipient)) the session, the pair and the survivors among
    the clients both neighbour (including themselves)."""
    ids = sorted(int(u) for u in survivors)
    head = b"fleetlearn/secagg/consistency" + session
    if pair is not None:
        head = b"fleetlearn/secagg/consistency-pair" + session + b"".join(int(c).to_bytes(_ID, "big", signed=True) for c in pair)
    return head + len(ids).to_bytes(_ID, "big") + b"".join(u.to_bytes(_ID, "big", signed=True) for u in ids)


def pair_consistency_message(d: KeyDirectory, me: int, peer: int, survivors: Iterable[int], signer: int) -> bytes:
    """SecAgg+'s ConsistencyCheck statement between neighbours `me` and `peer` (`signer` is one
    of them): the survivors (as `me` was told) among the clients within k/2 places of both on
    the ring, i.e. their common neighbourhood.  Both ends compute it from their own slice of
    the directory; the signature verifies only if they were told the same."""
    alive = set(survivors)
    n, half, at = d.size, d.degree // 2, d.positions[peer]
    common = [x for x in (me, *d.neighbors[me]) if x in alive and min((d.positions[x] - at) % n, (at - d.positions[x]) % n) <= half]
    return consistency_message(d.session, common, (signer, peer if signer == me else me))


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3, client -> server: b-shares of survivors, s_sk-shares of dropped."""

    client_id: int
    self_mask_shares: Mapping[int, bytes]
    mask_key_shares: Mapping[int, bytes]

    @property
    def nbytes(self) -> int:
        return _ID + sum(_ID + len(s) for s in self.self_mask_shares.values()) + sum(_ID + len(s) for s in self.mask_key_shares.values())


# -- primitives --------------------------------------------------------------------------
def _randbytes_from(rng: np.random.Generator | None) -> Callable[[int], bytes]:
    if rng is None:
        return os.urandom
    return lambda n: rng.bytes(n)


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _pair_info(label: bytes, u: int, v: int) -> bytes:
    a, b = (u, v) if u < v else (v, u)
    return label + a.to_bytes(_ID, "big", signed=True) + b.to_bytes(_ID, "big", signed=True)


def expand_mask(key: bytes, dim: int, modulus_bits: int) -> np.ndarray:
    """PRG(key): `dim` uniform elements of Z_{2^k} from one AES-256-CTR keystream."""
    width = 4 if modulus_bits <= 32 else 8
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    stream = enc.update(b"\x00" * (dim * width)) + enc.finalize()
    vals = np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    return vals & field_mask(modulus_bits)


def pairwise_mask_key(private_key: X25519PrivateKey, peer_public: bytes, session: bytes, u: int, v: int) -> bytes:
    """s_uv = HKDF(X25519(s_sk_u, s_pk_v)); symmetric in (u, v) (Bonawitz et al. 2017, round 'MaskedInputCollection')."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, session, _pair_info(b"fleetlearn/secagg/pairwise-mask/", u, v))


def self_mask_key(seed: bytes, session: bytes) -> bytes:
    """PRG key of the self mask b_u (Bonawitz et al. 2017, round 'MaskedInputCollection')."""
    return _hkdf(seed, session, b"fleetlearn/secagg/self-mask")


def _share_key(private_key: X25519PrivateKey, peer_public: bytes, session: bytes, u: int, v: int) -> bytes:
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, session, _pair_info(b"fleetlearn/secagg/share-encryption/", u, v))


def _aad(session: bytes, sender: int, recipient: int) -> bytes:
    return b"fleetlearn/secagg/share" + session + sender.to_bytes(_ID, "big", signed=True) + recipient.to_bytes(_ID, "big", signed=True)


class _Ring:
    """A pseudorandom order of U1 on a ring, keyed by the public session: a 4-round Feistel
    permutation of [0, 4^h) (keyed BLAKE2b round functions) cycle-walked into [0, n)
    (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", CT-RSA 2002).  Any party
    finds the client at a place (`rank_at`) or the place of a client (`position_of`) in
    O(1), without listing U1: a SecAgg+ client derives its k neighbours in O(k)."""

    def __init__(self, session: bytes, n: int):
        self.n = int(n)
        self.half = max(1, -(-max(self.n - 1, 1).bit_length() // 2))
        self.mask = (1 << self.half) - 1
        self.keys = [hashlib.sha256(b"fleetlearn/secagg/ring" + session + bytes([i])).digest() for i in range(4)]

    def _f(self, i: int, x: int) -> int:
        return int.from_bytes(hashlib.blake2b(x.to_bytes(8, "big"), digest_size=8, key=self.keys[i]).digest(), "big") & self.mask

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for i in range(4):
            left, right = right, left ^ self._f(i, right)
        return (left << self.half) | right

    def _decrypt(self, y: int) -> int:
        left, right = y >> self.half, y & self.mask
        for i in reversed(range(4)):
            left, right = right ^ self._f(i, left), left
        return (left << self.half) | right

    def rank_at(self, position: int) -> int:
        """The 0-based rank in U1 of the client at `position` on the ring."""
        x = self._encrypt(position)
        while x >= self.n:
            x = self._encrypt(x)
        return x

    def position_of(self, rank: int) -> int:
        """The place on the ring of the client of 0-based rank `rank` in U1."""
        x = self._decrypt(rank)
        while x >= self.n:
            x = self._decrypt(x)
        return x


def sparse_degree(degree: int | None, n: int) -> int | None:
    """The SecAgg+ graph degree k for n clients, or None for all pairs (no degree, or k >= n - 1)."""
    if degree is None or degree >= n - 1:
        return None
    k = int(degree)
    if k < 2 or k % 2:
        raise ValueError(f"secagg neighbors (SecAgg+ degree) must be an even integer >= 2, got {degree!r}")
    return k


def _ring_order(ids: Sequence[int], session: bytes) -> list[int]:
    """The clients (sorted ids) in their ring order."""
    ring = _Ring(session, len(ids))
    return [ids[ring.rank_at(p)] for p in range(len(ids))]


def _harary(order: Sequence[int], k: int) -> dict[int, tuple[int, ...]]:
    n = len(order)
    out: dict[int, set[int]] = {c: set() for c in order}
    for pos, c in enumerate(order):
        for off in range(1, k // 2 + 1):
            other = order[(pos + off) % n]
            out[c].add(other)
            out[other].add(c)
    return {c: tuple(sorted(v)) for c, v in out.items()}


def neighbor_graph(client_ids: Iterable[int], degree: int | None, session: bytes) -> dict[int, tuple[int, ...]]:
    """Who masks with and shares to whom.  ``degree=None`` (or >= n - 1): all
    pairs (Bonawitz et al. 2017).  Otherwise SecAgg+ (Bell et al. 2020):
    a Harary graph H_{k,n} (each node joined to its k/2 nearest
    positions on each side of a ring) over a pseudorandom order derived from the
    public session id (`_Ring`), so server and clients compute the same graph."""
    ids = sorted(int(c) for c in client_ids)
    k = sparse_degree(degree, len(ids))
    if k is None:
        return {c: tuple(x for x in ids if x != c) for c in ids}
    return _harary(_ring_order(ids, session), k)


def derive_neighborhood(d: KeyDirectory, client_id: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """`client_id`'s neighbours and (SecAgg+) their places on the ring, as every party derives
    them from the directory's public numbers: its share point, |U1|, the degree and the
    session, in O(k) under SecAgg+.  Raises SecAggError when the directory lacks a neighbour
    or its points are not ranks in U1 (distinct, in [1, |U1|], in the clients' order)."""
    me, n = int(client_id), int(d.size)
    if me not in d.points:
        raise SecAggError(f"the key directory has no share point for client {me}")
    by_point: dict[int, int] = {}
    for c, p in d.points.items():
        if not 1 <= p <= n or p in by_point:
            raise SecAggError(f"the key directory gives client {c} share point {p}; points are distinct ranks in [1, {n}]")
        by_point[p] = c
    ordered = [by_point[p] for p in sorted(by_point)]
    if ordered != sorted(ordered):
        raise SecAggError("the key directory's share points do not follow the clients' order (a point is the client's rank in U1)")
    try:
        k = sparse_degree(d.degree, n)
    except ValueError as exc:
        raise SecAggError(f"the key directory's graph degree: {exc}") from None
    if k is None:
        if d.degree is not None or len(d.points) != n:
            raise SecAggError(f"the key directory of an all-pairs round of {n} clients lists {len(d.points)} (degree {d.degree})")
        return tuple(c for c in ordered if c != me), {}
    ring = _Ring(d.session, n)
    at = ring.position_of(d.points[me] - 1)
    places = {me: at}
    for off in range(1, k // 2 + 1):
        for q in ((at + off) % n, (at - off) % n):
            c = by_point.get(ring.rank_at(q) + 1)
            if c is None:
                raise SecAggError(f"the key directory lacks client {me}'s neighbour at share point {ring.rank_at(q) + 1} (ring place {q} of {n})")
            places[c] = q
    return tuple(sorted(c for c in places if c != me)), places


def default_threshold(holders: int) -> int:
    """Honest majority of the share holders: t = floor(h / 2) + 1, at least 2."""
    return max(2, holders // 2 + 1)


# -- client ------------------------------------------------------------------------------
class SecAggClient:
    """One party of secure aggregation (Bonawitz et al., CCS 2017).

    Call in order: `advertise_keys()`, `share_keys(directory)`,
    `masked_input(forwarded, vector)`, `unmask(request)`.  The vector (already
    quantized into Z_{2^k}) is only needed in round 2, so training may happen
    between key sharing and masking, as on a real device.
    """

    def __init__(self, client_id: int, rng: np.random.Generator | None = None, consistency: bool = False):
        self.client_id = int(client_id)
        self._randbytes = _randbytes_from(rng)
        self._c_sk = X25519PrivateKey.from_private_bytes(self._randbytes(32))
        self._s_sk = X25519PrivateKey.from_private_bytes(self._randbytes(32))
        # ConsistencyCheck (Bonawitz et al. 2017): an Ed25519 key signing the survivor set U3.
        self._sign_sk = Ed25519PrivateKey.from_private_bytes(self._randbytes(32)) if consistency else None
        self._signed: frozenset[int] | None = None
        self._b_seed = self._randbytes(SECRET_BYTES)
        self._directory: KeyDirectory | None = None
        self._received: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # sender -> (s_sk share, b share)
        self._participants: frozenset[int] = frozenset()
        self._sent_masked = False
        self._revealed: dict[int, str] = {}  # u -> "self" | "key": never both

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 'AdvertiseKeys': the two fresh X25519 public keys (c_pk, s_pk)."""
        vk = b"" if self._sign_sk is None else _pub(self._sign_sk.public_key())
        return AdvertiseKeys(self.client_id, _pub(self._c_sk.public_key()), _pub(self._s_sk.public_key()), vk)

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Round 'ShareKeys': t-out-of-n Shamir shares of s_sk_u and b_u for
        each neighbour, AES-GCM encrypted to it, plus SHA-256(b_u).  The neighbours are
        derived here from the directory's public numbers (`derive_neighborhood`), never
        taken from the server."""
        me = self.client_id
        if me not in directory.keys:
            raise SecAggError(f"client {me} is not in the key directory")
        c_pk, s_pk = directory.keys[me]
        if c_pk != _pub(self._c_sk.public_key()) or s_pk != _pub(self._s_sk.public_key()):
            raise SecAggError(f"the key directory lists different public keys for client {me}")
        if len(set(p for pair in directory.keys.values() for p in pair)) != 2 * len(directory.keys):
            raise SecAggError("the key directory contains repeated public keys")
        if self._sign_sk is not None:
            if directory.signing_keys.get(me) != _pub(self._sign_sk.public_key()):
                raise SecAggError(f"the key directory lists a different verification key for client {me}")
            if set(directory.signing_keys) != set(directory.keys):
                raise SecAggError("the key directory lacks verification keys for the ConsistencyCheck round")
        holders, places = derive_neighborhood(directory, me)
        if me in directory.neighbors and tuple(directory.neighbors[me]) != holders:
            raise SecAggError(f"the key directory names neighbours {list(directory.neighbors[me])} for client {me}; "
                              f"the graph gives {list(holders)}")
        missing = [v for v in holders if v not in directory.keys]
        if missing:
            raise SecAggError(f"the key directory lacks the keys of client {me}'s neighbours {missing}")
        directory = replace(directory, neighbors={me: holders}, positions=places)
        self._directory = directory
        if directory.threshold > len(holders) or directory.threshold < 2:
            raise SecAggDropoutError(f"client {me} has {len(holders)} share holders; the threshold {directory.threshold} must be in [2, {len(holders)}]")
        xs = [directory.share_point(v) for v in holders]
        sk_shares = split_secret(_priv(self._s_sk), xs, directory.threshold, self._randbytes)
        b_shares = split_secret(self._b_seed, xs, directory.threshold, self._randbytes)
        out = {}
        for i, v in enumerate(holders):
            key = _share_key(self._c_sk, directory.keys[v][0], directory.session, me, v)
            nonce = self._randbytes(12)
            plain = share_to_bytes(sk_shares[i]) + share_to_bytes(b_shares[i])
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, _aad(directory.session, me, v))
        return ShareKeys(me, out, hashlib.sha256(self._b_seed).digest())

    def masked_input(self, forwarded: ForwardedShares, vector) -> MaskedInput:
        """Decrypt and check the shares received, then mask the input (round 'MaskedInputCollection')."""
        d = self._require_directory()
        if self._sent_masked:
            # Two differently masked inputs under the same masks would reveal their difference.
            raise SecAggError(f"client {self.client_id} already sent its masked input this round; refusing to mask again")
        if forwarded.recipient != self.client_id:
            raise SecAggError(f"client {self.client_id} got shares addressed to client {forwarded.recipient}")
        participants = frozenset(forwarded.participants)
        if self.client_id not in participants or not participants <= set(d.keys):
            raise SecAggError("the participant list (U2) is not a subset of the key directory containing this client")
        mine = set(d.neighbors[self.client_id])
        expected = (participants & mine) - {self.client_id}  # the graph is symmetric: v holds u's shares iff u holds v's
        if set(forwarded.encrypted_shares) != expected:
            raise SecAggError(f"client {self.client_id} expected shares from {sorted(expected)}, got {sorted(forwarded.encrypted_shares)}")
        for u, blob in forwarded.encrypted_shares.items():
            key = _share_key(self._c_sk, d.keys[u][0], d.session, self.client_id, u)
            try:
                plain = AESGCM(key).decrypt(blob[:12], blob[12:], _aad(d.session, u, self.client_id))
            except InvalidTag:
                raise SecAggTamperError(
                    f"the key shares from client {u} to client {self.client_id} failed AES-GCM authentication: "
                    "they were modified, swapped or replayed in transit; aborting this round"
                ) from None
            if len(plain) != 2 * _SHARE_LEN:
                raise SecAggTamperError(f"the key shares from client {u} have the wrong length")
            self._received[u] = (share_from_bytes(plain[:_SHARE_LEN], SECRET_BYTES), share_from_bytes(plain[_SHARE_LEN:], SECRET_BYTES))
        self._participants = participants
        x = check_field(np.asarray(vector).reshape(-1), d.modulus_bits)
        if x.size != d.dim:
            raise SecAggError(f"client {self.client_id}: input has {x.size} elements, the round expects {d.dim}")
        y = x.copy()
        y += expand_mask(self_mask_key(self._b_seed, d.session), d.dim, d.modulus_bits)
        for v in sorted(mine & participants):
            p = expand_mask(pairwise_mask_key(self._s_sk, d.keys[v][1], d.session, self.client_id, v), d.dim, d.modulus_bits)
            if self.client_id < v:
                y += p
            else:
                y -= p  # uint64 wrap-around is exact mod 2^k
        self._sent_masked = True
        return MaskedInput(self.client_id, y & field_mask(d.modulus_bits), d.modulus_bits)

    def consistency_check(self, request: UnmaskRequest) -> ConsistencySignature:
        """Round 'ConsistencyCheck': sign the survivor set once; it must contain this client.
        All pairs: one signature over (session, U3).  SecAgg+: `request` names the survivors
        among this client's neighbours, and it signs to each surviving neighbour the survivors
        of their common neighbourhood (`pair_consistency_message`): O(k) signatures."""
        d = self._require_directory()
        if self._sign_sk is None:
            raise SecAggError(f"client {self.client_id} was built without the ConsistencyCheck round (consistency=False)")
        if not self._sent_masked:
            raise SecAggError(f"client {self.client_id} has not sent its masked input")
        survivors = frozenset(int(u) for u in request.survivors)
        if self.client_id not in survivors or not survivors <= self._participants:
            raise SecAggError("the consistency check's survivor set (U3) must contain this client and lie within U2")
        if len(survivors) < d.threshold:
            raise SecAggDropoutError(f"only {len(survivors)} survivors, fewer than the threshold {d.threshold}")
        if self._signed is not None and self._signed != survivors:
            raise SecAggError(f"client {self.client_id} already signed another survivor set this round; refusing")
        self._signed = survivors
        me = self.client_id
        if d.degree is None:
            return ConsistencySignature(me, self._sign_sk.sign(consistency_message(d.session, survivors)))
        return ConsistencySignature(me, b"", {v: self._sign_sk.sign(pair_consistency_message(d, me, v, survivors, signer=me))
                                              for v in sorted(survivors - {me})})

    def unmask(self, request: UnmaskRequest, signatures: Mapping[int, bytes] | None = None) -> UnmaskShares:
        """Reveal b-shares of survivors and s_sk-shares of dropped clients
        (round 'Unmasking').  Refuses any request that would reveal both secrets
        of one client, which would let the server unmask that client's input.
        With the ConsistencyCheck round, `signatures` (client -> signature) must hold
        at least t valid signatures over the survivor set this client signed (SecAgg+: its
        neighbours' signatures addressed to it, over their common neighbourhood)."""
        d = self._require_directory()
        if not self._sent_masked:
            raise SecAggError(f"client {self.client_id} has not sent its masked input")
        if self._sign_sk is not None:
            self._verify_consistency(d, request, signatures or {})
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError(f"unmask request lists clients {sorted(survivors & dropped)} as both survived and dropped")
        if self.client_id not in survivors:
            raise SecAggError(f"unmask request does not list client {self.client_id} as a survivor")
        if not (survivors | dropped) <= self._participants:
            raise SecAggError("unmask request names clients outside U2")
        if len(survivors) < d.threshold:
            raise SecAggDropoutError(f"only {len(survivors)} survivors, fewer than the threshold {d.threshold}")
        self_shares, key_shares = {}, {}
        for u in sorted(survivors | dropped):
            if u not in self._received:
                continue
            kind = "self" if u in survivors else "key"
            if self._revealed.setdefault(u, kind) != kind:
                raise SecAggError(f"client {self.client_id} already revealed the other secret of client {u}; refusing")
            sk_share, b_share = self._received[u]
            if kind == "self":
                self_shares[u] = share_to_bytes(b_share)
            else:
                key_shares[u] = share_to_bytes(sk_share)
        return UnmaskShares(self.client_id, self_shares, key_shares)

    def _verify_consistency(self, d: KeyDirectory, request: UnmaskRequest, signatures: Mapping[int, bytes]) -> None:
        me = self.client_id
        if self._signed is None:
            raise SecAggError(f"client {me} has not signed a survivor set (ConsistencyCheck) before unmasking")
        if frozenset(request.survivors) != self._signed:
            raise SecAggError("the unmask request's survivor set differs from the one this client signed: the server is inconsistent; refusing")
        # All pairs: every signer signed (session, U3).  SecAgg+: each surviving neighbour signed to
        # this client the survivors of their common neighbourhood: it verifies only if both were told the same.
        signers = self._signed if d.degree is None else self._signed - {me}
        valid = 0
        for u, sig in signatures.items():
            u = int(u)
            key = d.signing_keys.get(u)
            if key is None or u not in signers:
                raise SecAggError(f"client {me} got a consistency signature from client {u}, which is not "
                                  f"{'in U3' if d.degree is None else 'one of its surviving neighbours'}")
            msg = (consistency_message(d.session, self._signed) if d.degree is None
                   else pair_consistency_message(d, me, u, self._signed, signer=u))
            try:
                Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
            except Exception:  # noqa: BLE001 - InvalidSignature, or a malformed key / signature
                raise SecAggTamperError(f"the consistency signature of client {u} to client {me} does not verify: "
                                        "the server showed them different survivor sets, or forged it; refusing to unmask") from None
            valid += 1
        if valid < d.threshold:
            raise SecAggDropoutError(f"only {valid} consistency signatures, fewer than the threshold {d.threshold}: refusing to unmask")

    def _require_directory(self) -> KeyDirectory:
        if self._directory is None:
            raise SecAggError(f"client {self.client_id} has not received the key directory")
        return self._directory


# -- server ------------------------------------------------------------------------------
class SecAggServer:
    """The aggregating server of Bonawitz et al. (CCS 2017).

    It keeps every message it receives in `inbox` (for audits and tests) and
    never holds an unmasked individual input: only masked vectors, the shares
    the protocol entitles it to, and the final sum.  Under SecAgg+ it sends each
    client only its slice of every answer (`directory_for`, `collect_shares`,
    `request_for`, `signatures_for`), and its own work is O(n k) besides the sum.
    """

    def __init__(
        self,
        dim: int,
        modulus_bits: int = 32,
        threshold: int | None = None,
        neighbors: int | None = None,
        rng: np.random.Generator | None = None,
    ):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        self.dim = int(dim)
        self.modulus_bits = check_modulus_bits(modulus_bits)
        self.threshold = threshold
        self.neighbors = neighbors
        self.session = _randbytes_from(rng)(16)
        self.inbox: list = []
        self.directory: KeyDirectory | None = None
        self.commitments: dict[int, bytes] = {}
        self.participants: tuple[int, ...] = ()
        self.masked: dict[int, np.ndarray] = {}
        self.survivors: tuple[int, ...] = ()
        self.dropped: tuple[int, ...] = ()
        self.dropped_set: frozenset[int] = frozenset()
        self.request: UnmaskRequest | None = None
        self._u3_message: bytes | None = None
        self.signed: dict[int, ConsistencySignature] = {}  # U4: who signed, and what

    # round 0
    def advertise(self, messages: Sequence[AdvertiseKeys]) -> KeyDirectory:
        """Collect public keys (U1), fix the threshold and the neighbour graph; returns the
        whole directory (each client receives `directory_for(client)`)."""
        self.inbox.extend(messages)
        keys, signing = {}, {}
        for m in messages:
            if m.client_id in keys:
                raise SecAggError(f"client {m.client_id} advertised keys twice")
            keys[m.client_id] = (m.cipher_public_key, m.mask_public_key)
            if m.signing_public_key:
                signing[m.client_id] = m.signing_public_key
        if signing and set(signing) != set(keys):
            raise SecAggError(f"clients {sorted(set(keys) - set(signing))} advertised no verification key; the others did")
        n = len(keys)
        if n < 3:
            raise SecAggDropoutError(f"secure aggregation needs at least 3 clients, {n} advertised keys")
        ids = sorted(keys)
        k = sparse_degree(self.neighbors, n)
        if k is None:
            graph, places = neighbor_graph(ids, None, self.session), {}
        else:
            order = _ring_order(ids, self.session)
            graph, places = _harary(order, k), {c: p for p, c in enumerate(order)}
        holders = min(len(v) for v in graph.values())
        t = default_threshold(holders) if self.threshold is None else int(self.threshold)
        if not (2 <= t <= holders):
            raise SecAggDropoutError(f"threshold {t} must be in [2, {holders}] (the share holders each client has among the {n} clients)")
        self.threshold = t
        points = {c: i + 1 for i, c in enumerate(ids)}
        self.directory = KeyDirectory(self.session, t, self.modulus_bits, self.dim, keys, graph, signing, points, n, k, places)
        return self.directory

    def directory_for(self, client_id: int) -> KeyDirectory:
        """What `client_id` is sent after round 0: its slice of the directory (`KeyDirectory.slice`)."""
        return self._require(self.directory, "advertise").slice(client_id)

    def _near(self, client_id: int) -> tuple[int, ...]:
        """The client and its neighbours: what it may be told about."""
        return (client_id, *self.directory.neighbors[client_id])

    # round 1
    def collect_shares(self, messages: Sequence[ShareKeys]) -> dict[int, ForwardedShares]:
        """Collect encrypted shares (U2) and route each ciphertext to its recipient, unread,
        with U2 among the recipient and its neighbours."""
        d = self._require(self.directory, "advertise")
        self.inbox.extend(messages)
        senders = {m.client_id: m for m in messages}
        if not set(senders) <= set(d.keys):
            raise SecAggError(f"shares from clients {sorted(set(senders) - set(d.keys))} that did not advertise keys")
        self._check_alive(set(senders), set(senders), "shared keys")
        for u, m in senders.items():
            if set(m.encrypted_shares) != set(d.neighbors[u]):
                raise SecAggError(f"client {u} sent shares to {sorted(m.encrypted_shares)}, its neighbours are {list(d.neighbors[u])}")
        self.commitments = {u: m.self_mask_commitment for u, m in senders.items()}
        self.participants = tuple(sorted(senders))
        out = {}
        for v in self.participants:
            boxes = {u: senders[u].encrypted_shares[v] for u in d.neighbors[v] if u in senders}
            out[v] = ForwardedShares(v, boxes, tuple(sorted(u for u in self._near(v) if u in senders)))
        return out

    # round 2
    def collect_masked(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Collect masked inputs (U3); fail early if some needed secret cannot be rebuilt.
        Returns the whole request; each survivor is sent `request_for(client)`."""
        d = self._require(self.directory, "advertise")
        self.inbox.extend(messages)
        got, u2 = {}, set(self.participants)
        for m in messages:
            if m.client_id not in u2:
                raise SecAggError(f"masked input from client {m.client_id}, which is not in U2")
            got[m.client_id] = check_field(m.masked, self.modulus_bits)
            if got[m.client_id].shape != (d.dim,):
                raise SecAggError(f"masked input from client {m.client_id} has shape {got[m.client_id].shape}, expected ({d.dim},)")
        survivors = set(got)
        dropped = u2 - survivors
        # Every client whose secret must be rebuilt needs t holders among the survivors.
        self._check_alive(survivors, u2, "sent masked inputs")
        self.masked = got
        self.survivors, self.dropped = tuple(sorted(survivors)), tuple(sorted(dropped))
        self.dropped_set = frozenset(dropped)
        self.request = UnmaskRequest(self.survivors, self.dropped)
        return self.request

    def request_for(self, client_id: int) -> UnmaskRequest:
        """What `client_id` is told of U3 and U2 \\ U3: all of it under all pairs; under SecAgg+
        the survivors and dropped clients among itself and its neighbours."""
        d, request = self._require(self.directory, "advertise"), self._require(self.request, "collect_masked")
        if d.degree is None:
            return request
        near = self._near(client_id)
        return UnmaskRequest(tuple(sorted(u for u in near if u in self.masked)), tuple(sorted(u for u in near if u in self.dropped_set)))

    def surviving_neighbors(self, client_id: int) -> tuple[int, ...]:
        """The neighbours of `client_id` in U3: whom it signs to under SecAgg+."""
        return tuple(v for v in self.directory.neighbors[client_id] if v in self.masked)

    # ConsistencyCheck (between rounds 2 and 3)
    def check_signature(self, m: ConsistencySignature) -> None:
        """Verify one client's ConsistencyCheck message (raises SecAggError naming the client):
        all pairs, one signature over (session, U3); SecAgg+, one to each of its surviving
        neighbours over their common neighbourhood's survivors, and to no one else."""
        d = self._require(self.directory, "advertise")
        self._require(self.request, "collect_masked")
        u = m.client_id
        key = d.signing_keys.get(u)
        if u not in self.masked or key is None:
            raise SecAggError(f"consistency signature from client {u}, which is not in U3 or has no verification key")
        if d.degree is None:
            if m.neighbor_signatures:
                raise SecAggError(f"client {u} sent per-neighbour consistency signatures in an all-pairs round (one over U3 is expected)")
            if self._u3_message is None:
                self._u3_message = consistency_message(d.session, self.survivors)
            statements = {None: (m.signature, self._u3_message)}
        else:
            want = set(self.surviving_neighbors(u))
            if m.signature or set(m.neighbor_signatures) != want:
                raise SecAggError(f"client {u} signed to clients {sorted(m.neighbor_signatures)}; its surviving neighbours are {sorted(want)}")
            statements = {v: (sig, pair_consistency_message(d, u, v, self.masked, signer=u)) for v, sig in m.neighbor_signatures.items()}
        verifier = Ed25519PublicKey.from_public_bytes(key)
        for v, (sig, text) in statements.items():
            try:
                verifier.verify(sig, text)
            except Exception:  # noqa: BLE001 - InvalidSignature, or a malformed signature
                to = "" if v is None else f" to client {v}"
                raise SecAggError(f"the consistency signature of client {u}{to} does not verify") from None

    def collect_signatures(self, messages: Sequence[ConsistencySignature], verified: bool = False) -> dict[int, ConsistencySignature]:
        """Collect U4's consistency messages, verified here (`check_signature`; ``verified=True``:
        the caller already checked each as it arrived), to relay with the unmask request
        (`signatures_for`); fewer than t signers fail the round."""
        self.inbox.extend(messages)
        out: dict[int, ConsistencySignature] = {}
        for m in messages:
            if not verified:
                self.check_signature(m)
            out[m.client_id] = m
        self._check_alive(set(out), set(self.participants), "signed the survivor set")
        self.signed = out
        return out

    def signatures_for(self, client_id: int) -> dict[int, bytes]:
        """The consistency signatures `client_id` checks before unmasking: all of U4's under all
        pairs; under SecAgg+ those its neighbours in U4 addressed to it."""
        d = self._require(self.directory, "advertise")
        if d.degree is None:
            return {u: m.signature for u, m in self.signed.items()}
        return {w: self.signed[w].neighbor_signatures[client_id] for w in d.neighbors[client_id]
                if w in self.signed and client_id in self.signed[w].neighbor_signatures}

    # round 3
    def unmask(self, messages: Sequence[UnmaskShares]) -> np.ndarray:
        """Reconstruct, remove masks, return sum_{u in U3} x_u in Z_{2^k} (uint64)."""
        d = self._require(self.directory, "advertise")
        self.inbox.extend(messages)
        responders = {m.client_id: m for m in messages if m.client_id in self.masked}
        self._check_alive(set(responders), set(self.participants), "answered the unmasking request")
        k = self.modulus_bits
        total = np.zeros(d.dim, dtype=np.uint64)
        for u in self.survivors:
            total += self.masked[u]
        for u in self.survivors:
            seed = self._reconstruct(u, responders, "self_mask_shares")
            if hashlib.sha256(seed).digest() != self.commitments[u]:
                raise SecAggError(f"the reconstructed self-mask seed of client {u} does not match its commitment: a share holder sent a wrong share")
            total -= expand_mask(self_mask_key(seed, d.session), d.dim, k)
        for u in self.dropped:
            raw = self._reconstruct(u, responders, "mask_key_shares")
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if _pub(s_sk.public_key()) != d.keys[u][1]:
                raise SecAggError(f"the reconstructed mask key of dropped client {u} does not match its public key: a share holder sent a wrong share")
            for v in d.neighbors[u]:
                if v not in self.masked:
                    continue  # only survivors' inputs carry a mask shared with u
                p = expand_mask(pairwise_mask_key(s_sk, d.keys[v][1], d.session, u, v), d.dim, k)
                # y_v holds +p if v < u, -p if v > u: undo it.
                if v < u:
                    total -= p
                else:
                    total += p
        return total & field_mask(k)

    def _reconstruct(self, u: int, responders: Mapping[int, UnmaskShares], kind: str) -> bytes:
        d = self.directory
        points, rows = [], []
        for v in d.neighbors[u]:  # u's share holders: O(k) under SecAgg+
            blob = getattr(responders[v], kind).get(u) if v in responders else None
            if blob is None:
                continue
            points.append(d.share_point(v))
            rows.append(share_from_bytes(blob, SECRET_BYTES))
            if len(points) == d.threshold:
                break
        if len(points) < d.threshold:
            raise SecAggDropoutError(f"only {len(points)} shares for client {u}, threshold {d.threshold}: the round fails")
        try:
            return combine_shares(points, np.stack(rows), SECRET_BYTES)
        except ShamirError as exc:
            raise SecAggError(f"cannot reconstruct the secret of client {u}: {exc}") from None

    def _check_alive(self, alive: set[int], needed: set[int], stage: str) -> None:
        d = self.directory
        t = d.threshold
        if len(alive) < t:
            raise SecAggDropoutError(
                f"only {len(alive)} of {len(d.keys)} clients {stage}, fewer than the threshold t = {t}: "
                "the masks cannot be removed and this round fails"
            )
        for u in sorted(needed):
            live = sum(1 for v in d.neighbors[u] if v in alive)
            if live < t:
                raise SecAggDropoutError(
                    f"client {u} has only {live} live share holders after clients {stage}, fewer than the threshold t = {t}: "
                    "its mask cannot be removed and this round fails"
                )

    @staticmethod
    def _require(value, stage: str):
        if value is None:
            raise SecAggError(f"server round out of order: run {stage} first")
        return value


# -- in-process run for the simulation ------------------------------------------------------
@dataclass
class SecAggTranscript:
    """What an in-process run produced: the sum, who survived, and the server
    (whose `inbox` holds every message it received)."""

    sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    server: SecAggServer
    client_bytes: dict[int, int] = field(default_factory=dict)  # uplink bytes per client


def run_secagg(
    quantized_vectors,
    dropouts: Iterable[int] = (),
    threshold: int | None = None,
    seed: int | np.random.Generator | None = None,
    *,
    modulus_bits: int = 32,
    neighbors: int | None = None,
    late_dropouts: Iterable[int] = (),
    client_ids: Sequence[int] | None = None,
    consistency: bool = False,
) -> SecAggTranscript:
    """Run the whole message flow in-process (the simulation transport).

    Row i of `quantized_vectors` ((n, d) elements of Z_{2^k}) belongs to
    client ``client_ids[i]`` (default: i).  Rows in `dropouts` drop after key
    sharing (they never send a masked input: their pairwise masks are
    recovered); rows in `late_dropouts` drop after sending the masked input
    (their input counts, their self mask is recovered from shares).  Each client
    receives only its slice of the server's answers, as over a network.
    ``consistency=True`` adds the signed ConsistencyCheck round."""
    k = check_modulus_bits(modulus_bits)
    x = check_field(quantized_vectors, k)
    if x.ndim != 2:
        raise ValueError(f"quantized_vectors must be (n, d), got shape {x.shape}")
    n, dim = x.shape
    ids = list(range(n)) if client_ids is None else [int(c) for c in client_ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError("client_ids must be n distinct integers")
    drop = {int(i) for i in dropouts}
    late = {int(i) for i in late_dropouts}
    if not drop | late <= set(range(n)):
        raise ValueError("dropouts must be row indices in [0, n)")
    rng = seed if isinstance(seed, np.random.Generator) else (None if seed is None else np.random.default_rng(seed))
    server = SecAggServer(dim, k, threshold, neighbors, rng)
    clients = {ids[i]: SecAggClient(ids[i], rng, consistency) for i in range(n)}
    sent: dict[int, int] = {c: 0 for c in ids}

    def track(msgs):
        for m in msgs:
            sent[m.client_id] += m.nbytes
        return msgs

    server.advertise(track([c.advertise_keys() for c in clients.values()]))
    forwarded = server.collect_shares(track([c.share_keys(server.directory_for(cid)) for cid, c in clients.items()]))
    masked = track([clients[ids[i]].masked_input(forwarded[ids[i]], x[i]) for i in range(n) if i not in drop])
    server.collect_masked(masked)
    answering = [ids[i] for i in range(n) if i not in drop and i not in late]
    if consistency:
        server.collect_signatures(track([clients[c].consistency_check(server.request_for(c)) for c in answering]))
    answers = track([clients[c].unmask(server.request_for(c), server.signatures_for(c) if consistency else None) for c in answering])
    total = server.unmask(answers)
    return SecAggTranscript(total, server.survivors, server.dropped, server, sent)



def secure_sum(
    quantized_vectors,
    dropouts: Iterable[int] = (),
    threshold: int | None = None,
    seed: int | np.random.Generator | None = None,
    **kwargs,
) -> np.ndarray:
    """Sum of the quantized rows of the clients that did not drop, computed by
    the full secure aggregation message flow (Bonawitz et al., CCS 2017) --
    exactly equal, in Z_{2^k}, to the plain sum of those rows.  Cost: O(n^2)
    X25519 agreements and mask expansions per call (O(n k) with
    ``neighbors=k``).  See `run_secagg` for the arguments."""
    return run_secagg(quantized_vectors, dropouts, threshold, seed, **kwargs).sum


@dataclass(frozen=True)
class RowRecipe:
    """How a client turns its update into the row it secure-sums: public numbers the
    server sends each client of a networked round (the simulation applies them itself).

    row = clip(update, clip_norm) * scale * weight, then, when ``indicator_norm > 0``,
    one more coordinate ``1[||update|| <= indicator_norm] - 1/2`` (adaptive clipping's
    centered indicator, unweighted).  ``clip_norm = 0``: no clipping."""

    clip_norm: float = 0.0
    scale: float = 1.0
    indicator_norm: float = 0.0

    def width(self, dim: int) -> int:
        return int(dim) + (1 if self.indicator_norm > 0 else 0)

    def row(self, update, weight: float = 1.0) -> np.ndarray:
        """One client's row (float64) from its (d,) update."""
        u = torch.as_tensor(update).reshape(-1)
        norm = float(torch.linalg.vector_norm(u))  # as dp.clip_updates measures it
        r = u.to(torch.float64)
        if 0 < self.clip_norm < norm:  # DP-FedAvg's ClipFn: row * min(1, C / ||row||)
            r = r * (self.clip_norm / norm)
        r = r * float(self.scale) * float(weight)
        if self.indicator_norm > 0:
            r = torch.cat([r, torch.tensor([float(norm <= self.indicator_norm) - 0.5], dtype=torch.float64)])
        return r.numpy()


@dataclass
class RemoteSum:
    """What a transport's secure aggregation returned: the field sum of the survivors'
    rows, who survived (U3) and who dropped during the protocol, and its measurements
    (bytes and seconds per stage, for the round record)."""

    sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    measurements: dict = field(default_factory=dict)
    client_bytes: dict = field(default_factory=dict)  # client -> (bytes sent, bytes received) in the protocol


class SecureAggregation:
    """The `secagg` part: quantize -> secure sum -> dequantize.

    `sum(updates (n, d), dropped)` is what the clients' quantized rows sum to,
    via `secure_sum`; `aggregate(updates, weights)` keeps the aggregator
    contract (weighted mean: each client scales its row by its public,
    normalised weight before quantizing, so the server only learns the sum).
    The server never needs individual updates, so robust aggregators that do
    cannot be combined with it (see `check_compatible`).
    """

    name = "secagg"
    needs_individual_updates = False

    def __init__(
        self,
        clip_range: float = 1.0,
        max_clients: int = 1000,
        modulus_bits: int = 32,
        threshold: int | float | None = None,
        neighbors: int | None = None,
        rounding: str = "stochastic",
        seed: int | None = None,
    ):
        self.quantizer = Quantizer(clip_range, max_clients, modulus_bits, rounding)
        if threshold is not None and not (isinstance(threshold, int) and threshold >= 2 or isinstance(threshold, float) and 0 < threshold <= 1):
            raise ValueError(f"secagg threshold must be an integer >= 2 or a fraction in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self.neighbors = neighbors
        self.rng = None if seed is None else np.random.default_rng([int(seed), 0x5EC466])
        self.last: SecAggTranscript | None = None
        # Over a network the clients hold their updates and run the protocol with the
        # server (a transport's `secure_aggregation()`, e.g. gRPC): then `remote_sum`.
        self.remote = None
        self.last_remote: RemoteSum | None = None

    @property
    def rounding(self) -> str:
        return self.quantizer.rounding

    def remote_sum(self, round: int, client_ids, recipe: RowRecipe, weights=None, dim: int | None = None) -> tuple[torch.Tensor, RemoteSum]:
        """The dequantized sum of the clients' rows, each client masking its own row
        (`recipe` applied on its device): the server never holds an individual row.  `dim`:
        the entries of the vector each client holds (None: the model's; a count-sketch
        uplink's clients hold their tables, `CodecChain.summand`)."""
        if self.remote is None:
            raise ValueError("secure aggregation has no remote half: the rows are here, use sum()")
        ids = [int(c) for c in client_ids]
        w = np.ones(len(ids)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(ids) > self.quantizer.max_clients:
            raise ValueError(f"{len(ids)} clients exceed the quantizer's headroom (max_clients = {self.quantizer.max_clients})")
        self.last_remote = None
        try:
            res = self.remote.secure_sum(int(round), ids, w, recipe, self, dim=dim)
        except SecAggError as exc:  # too many dropouts, a wrong share: the round fails, model unchanged
            raise ValueError(f"secure aggregation failed: {exc}") from None
        self.last_remote = res
        return torch.from_numpy(self.quantizer.dequantize(res.sum, count=len(res.survivors))), res

    def _threshold(self, n: int) -> int | None:
        if self.threshold is None or isinstance(self.threshold, int):
            return self.threshold
        holders = n - 1 if self.neighbors is None or self.neighbors >= n - 1 else self.neighbors
        return max(2, math.ceil(self.threshold * holders))

    def sum(self, updates, dropped: int = 0) -> torch.Tensor:
        """Securely summed rows (float64).  `dropped` extra clients took part in
        key sharing and then dropped: their masks are recovered, as on a fleet."""
        u = updates.detach().cpu().numpy() if isinstance(updates, torch.Tensor) else np.asarray(updates)
        if u.ndim != 2 or u.shape[0] == 0:
            raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {u.shape}")
        n = u.shape[0]
        if n > self.quantizer.max_clients:
            raise ValueError(f"{n} clients exceed the quantizer's headroom (max_clients = {self.quantizer.max_clients})")
        q = self.quantizer.quantize(u, self.rng)  # each client quantizes its own row
        if dropped:
            q = np.concatenate([q, np.zeros((int(dropped), q.shape[1]), dtype=np.uint64)])
        self.last = run_secagg(
            q,
            dropouts=range(n, n + int(dropped)),
            threshold=self._threshold(n + int(dropped)),
            seed=self.rng,
            modulus_bits=self.quantizer.modulus_bits,
            neighbors=self.neighbors,
        )
        return torch.from_numpy(self.quantizer.dequantize(self.last.sum, count=n))

    def aggregate(self, updates, weights=None, dropped: int = 0, *, round: int = 0, client_ids=None) -> torch.Tensor:
        """Weighted mean through secure aggregation; weights are public claims.  With a
        remote half the clients weight and mask their own rows (`updates` is then only
        the placeholder matrix), and the mean is over the clients that survived."""
        if self.remote is not None:
            w = np.asarray(weights if weights is not None else np.ones(len(client_ids)), dtype=np.float64)
            w = w / w.sum()
            dim = None if updates is None else int(torch.as_tensor(updates).shape[1])  # the placeholder rows' width
            total, res = self.remote_sum(round, client_ids, RowRecipe(), w, dim=dim)
            alive = np.isin(np.asarray(client_ids), np.asarray(res.survivors, dtype=np.int64))
            return (total / float(w[alive].sum())).to(torch.float32)
        u = torch.as_tensor(updates)
        if u.ndim != 2 or u.shape[0] == 0:
            raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {tuple(u.shape)}")
        w = torch.ones(u.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (u.shape[0],) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be finite, non-negative, not all zero, one per row")
        rows = u.to(torch.float64) * (w / w.sum()).unsqueeze(1)
        out_dtype = u.dtype if u.is_floating_point() else torch.float32
        return self.sum(rows, dropped=dropped).to(out_dtype)
