"""A small Hoard gateway client (protocol version 1), written from docs/PROTOCOL.md alone.

Needs the Debian packages python3-msgpack, python3-websockets and python3-nacl (run it with
/usr/bin/python3). Section numbers below refer to docs/PROTOCOL.md.
"""
import asyncio
import hashlib
import os
import time

import msgpack
import websockets
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

# ---------------------------------------------------------------- constants (section 6)
FRAME_BYTES_MAX = 262144
CLICKS_PER_FRAME_MAX = 2048
CLICK_COUNT_MAX = 1000000
EVENTS_IN_FLIGHT_PER_CONNECTION_MAX = 1024
SUBSCRIPTIONS_PER_CONNECTION_MAX = 16
OPEN_OFFERS_PER_PLAYER_MAX = 16
OFFER_TTL_MS_MAX = 86400000
LEADERBOARD_ENTRIES_MAX = 100
SESSION_TOKEN_TTL_MS_MAX = 604800000
AUTH_TIMEOUT_MS = 10000
PROTOCOL_ERRORS_PER_CONNECTION_MAX = 64
TX_PAYLOAD_BYTES_MAX = 65536
TX_SIGNATURES_MAX = 4
EXPIRY_WINDOW_BLOCKS = 100000

# signing domains (2.1, 3.1, 3.2)
TX_DOMAIN = b"hoard/tx/v1\0"
AUTH_DOMAIN = b"hoard/auth/v1\0"
SESSION_DOMAIN = b"hoard/session/v1\0"

# messages the gateway sends without a request_id (4.1 - 4.6)
PUSHES = frozenset({"committed", "rejected", "activity", "offer_received", "offer_closed", "clicks_ack"})


# ---------------------------------------------------------------- encoding (section 2)
def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def amount(n: int) -> bytes:
    """Amount: bin 16, big-endian unsigned 128-bit."""
    return n.to_bytes(16, "big")


def amount_int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def new_event_id() -> bytes:
    """EventId: 16 bytes, client-chosen; random is fine."""
    return os.urandom(16)


def now_ms() -> int:
    return int(time.time() * 1000)


def pretty(obj, limit=None):
    """A decoded message with bin shown as short hex, for reports."""
    if isinstance(obj, (bytes, bytearray)):
        h = bytes(obj).hex()
        return "0x" + (h if len(h) <= 16 else h[:12] + "..(%dB)" % len(obj))
    if isinstance(obj, dict):
        out = {pretty(k): pretty(v) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = [pretty(v) for v in obj]
    else:
        out = obj
    if limit is not None:
        text = str(out)
        return text if len(text) <= limit else text[:limit] + "..."
    return out


class Keypair:
    """An ed25519 key (RFC 8032) from a 32-byte seed."""

    def __init__(self, seed: bytes = None):
        self.seed = seed if seed is not None else os.urandom(32)
        self._sk = SigningKey(self.seed)
        self.public = bytes(self._sk.verify_key)

    @classmethod
    def from_seed_hex(cls, seed_hex: str):
        return cls(bytes.fromhex(seed_hex))

    def sign(self, msg: bytes) -> bytes:
        return self._sk.sign(msg).signature


def verify(public: bytes, msg: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public).verify(msg, signature)
        return True
    except (BadSignatureError, ValueError):
        return False


# ---------------------------------------------------------------- transactions (2.1)
def body(variant: str, *fields):
    """TxBody: a one-entry map {variant: [fields in order]}."""
    return {variant: list(fields)}


def asset_currency(currency: str, n: int):
    return {"currency": [currency, amount(n)]}


def asset_item(item_id: int):
    return {"item": [item_id]}


def grant_currency(currency: str, n: int):
    return {"currency": [currency, amount(n)]}


def grant_unique(cls: str, item_id: int, attributes_hash: bytes = b"\0" * 32):
    return {"unique": [cls, item_id, attributes_hash]}


def grant_stack(cls: str, item_id: int, quantity: int):
    return {"stack": [cls, item_id, amount(quantity)]}


def swap_side(account: bytes, gives):
    return [account, list(gives)]


def payload(chain_id: int, tenant: int, event_id: bytes, expires_at: int, txbody) -> bytes:
    """TxPayload, encoded as an array: [chain_id, tenant, event_id, expires_at, body]."""
    return pack([chain_id, tenant, event_id, expires_at, txbody])


def payload_event_id(payload_bytes: bytes) -> bytes:
    return unpack(payload_bytes)[2]


def tx_signature(payload_bytes: bytes, signer: Keypair):
    return {"signer": signer.public, "signature": signer.sign(TX_DOMAIN + payload_bytes)}


def sign_tx(payload_bytes: bytes, *signers: Keypair):
    """Transaction = {payload, signatures: [{signer, signature}]}; each over TX_DOMAIN || payload."""
    return {"payload": payload_bytes, "signatures": [tx_signature(payload_bytes, k) for k in signers]}


# ---------------------------------------------------------------- credentials (3.1, 3.2)
def auth_signature(studio: Keypair, challenge: bytes, tenant: int) -> bytes:
    return studio.sign(AUTH_DOMAIN + challenge + tenant.to_bytes(8, "big"))


def session_token_message(tenant: int, player: bytes, expires_unix_ms: int) -> bytes:
    return SESSION_DOMAIN + tenant.to_bytes(8, "big") + player + expires_unix_ms.to_bytes(8, "big")


def session_token(studio: Keypair, tenant: int, player: bytes, expires_unix_ms: int):
    """SessionToken, signed offline by the studio key."""
    sig = studio.sign(session_token_message(tenant, player, expires_unix_ms))
    return {"tenant": tenant, "player": player, "expires_unix_ms": expires_unix_ms, "signature": sig}


def derive_event_id(*parts: bytes) -> bytes:
    """EventId::derive: the first 16 bytes of SHA-256 of the concatenation (4.5)."""
    return hashlib.sha256(b"".join(parts)).digest()[:16]


def settle_event_id(tenant: int, window: int, chunk: int) -> bytes:
    return derive_event_id(b"hoard/settle/v1", tenant.to_bytes(8, "big"), window.to_bytes(8, "big"),
                           chunk.to_bytes(4, "big"))


# ---------------------------------------------------------------- connection
class HoardError(Exception):
    """An `error` answer (section 5)."""

    def __init__(self, body):
        self.body = body
        self.code = body.get("code")
        super().__init__(f"{self.code}: {body.get('message')}")


class Closed(Exception):
    def __init__(self, code, reason):
        self.code, self.reason = code, reason
        super().__init__(f"connection closed {code} {reason!r}")


class Conn:
    """One WebSocket connection. A reader task keeps every received message, as (name, body), in
    `inbox` (consumed by `wait`) and in `log` (never consumed); `closed` is (code, reason) once the
    connection is closed and `closed_at` the monotonic time it happened."""

    def __init__(self, ws, hello):
        self.ws = ws
        self.hello = hello
        self.chain_id = hello["chain_id"]
        self.challenge = hello["challenge"]
        self.limits = hello["limits"]
        self.opened_at = time.monotonic()
        self.inbox = []
        self.log = []
        self.cond = asyncio.Condition()
        self.closed = None
        self.closed_at = None
        self.next_rid = 100
        self.tenant = None
        self.role = None
        self.account = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url, timeout=10.0):
        """Connect and read `hello` (the gateway's first message)."""
        ws = await asyncio.wait_for(
            websockets.connect(url, max_size=None, ping_interval=None, close_timeout=2, open_timeout=timeout),
            timeout)
        try:
            first = unpack(await asyncio.wait_for(ws.recv(), timeout))
            (name, hello), = first.items()
            if name != "hello":
                raise RuntimeError(f"first message is not hello: {pretty(first)}")
        except BaseException:
            await ws.close()
            raise
        return cls(ws, hello)

    async def _read(self):
        try:
            async for frame in self.ws:
                if isinstance(frame, str):
                    msg = ("<text frame>", {"text": frame})
                else:
                    try:
                        (name, b), = unpack(frame).items()
                        msg = (name, b if isinstance(b, dict) else {"<value>": b})
                    except Exception:  # noqa: BLE001 - kept for the report
                        msg = ("<undecodable>", {"bytes": frame})
                async with self.cond:
                    self.inbox.append(msg)
                    self.log.append(msg)
                    self.cond.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = (self.ws.close_code, self.ws.close_reason)
            self.closed_at = time.monotonic()
            async with self.cond:
                self.cond.notify_all()

    def rid(self) -> int:
        """A fresh request id; ids only grow, so they also serve as click sequence numbers (4.2)."""
        self.next_rid += 1
        return self.next_rid

    def reserve_rids(self, at_least: int):
        self.next_rid = max(self.next_rid, at_least)

    async def send_raw(self, data):
        await self.ws.send(data)

    async def send(self, name, fields):
        await self.ws.send(pack({name: fields}))

    async def wait(self, pred, timeout=10.0, consume=True):
        """The first received message (name, body) matching pred; raises asyncio.TimeoutError or
        Closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self.cond:
            while True:
                for i, m in enumerate(self.inbox):
                    if pred(m):
                        if consume:
                            del self.inbox[i]
                        return m
                if self.closed is not None:
                    raise Closed(*self.closed)
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError()
                try:
                    await asyncio.wait_for(self.cond.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def wait_close(self, timeout=5.0):
        """(code, reason) once closed, or None if still open after timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        except asyncio.TimeoutError:
            return None
        return self.closed

    async def send_request(self, name, rid=None, **fields) -> int:
        rid = self.rid() if rid is None else rid
        await self.send(name, {"request_id": rid, **fields})
        return rid

    async def answer(self, rid, timeout=10.0):
        """The answer carrying request_id rid; raises HoardError for `error`."""
        m = await self.wait(lambda m: m[0] not in PUSHES and m[1].get("request_id") == rid, timeout)
        if m[0] == "error":
            raise HoardError(m[1])
        return m

    async def request(self, name, timeout=10.0, rid=None, **fields):
        """Send {name: {request_id, **fields}}; return the answer (name, body)."""
        rid = await self.send_request(name, rid=rid, **fields)
        return await self.answer(rid, timeout)

    async def call(self, name, timeout=10.0, **fields):
        """Like request, but returns only the answer's body."""
        return (await self.request(name, timeout=timeout, **fields))[1]

    # ---- authentication (3.1, 3.2)
    async def auth_studio(self, tenant: int, studio: Keypair):
        b = await self.call("auth_studio", tenant=tenant, signature=auth_signature(studio, self.challenge, tenant))
        self.tenant, self.role = b.get("tenant"), b.get("role")
        return b

    async def auth_player(self, token):
        b = await self.call("auth_player", token=token)
        self.tenant, self.role, self.account = b.get("tenant"), b.get("role"), b.get("account")
        return b

    # ---- clicks (4.2)
    async def clicks(self, clicks, seq=None, timeout=10.0):
        """Send one clicks message (sequence = a fresh request id unless given) and wait for the
        clicks_ack covering it; raises HoardError if it is refused."""
        seq = self.rid() if seq is None else seq
        await self.send("clicks", {"request_id": seq, "clicks": clicks})
        return await self.clicks_result(seq, timeout)

    async def clicks_result(self, seq, timeout=10.0):
        m = await self.wait(lambda m: (m[0] == "clicks_ack" and m[1].get("up_to", -1) >= seq)
                            or (m[0] == "error" and m[1].get("request_id") == seq), timeout, consume=False)
        if m[0] == "error":
            async with self.cond:
                if m in self.inbox:
                    self.inbox.remove(m)
            raise HoardError(m[1])
        return m[1]

    # ---- asset events (4.3)
    async def head(self):
        return await self.call("head")

    async def submit(self, tx, rid=None, timeout=10.0):
        """Returns the `accepted` body; raises HoardError."""
        return (await self.request("submit", rid=rid, timeout=timeout, tx=tx))[1]

    async def outcome(self, event_id, timeout=30.0):
        """The next committed/rejected push for event_id, as (name, body)."""
        return await self.wait(lambda m: m[0] in ("committed", "rejected") and m[1].get("event_id") == event_id,
                               timeout)

    async def outcome_or_none(self, event_id, timeout=30.0):
        """Like `outcome`, but None when no push comes within `timeout`."""
        try:
            return await self.outcome(event_id, timeout)
        except asyncio.TimeoutError:
            return None

    async def submit_and_wait(self, tx, timeout=30.0):
        acc = await self.submit(tx)
        return acc, await self.outcome(payload_event_id(tx["payload"]), timeout)

    async def close(self):
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except Exception:  # noqa: BLE001
            pass
        self.reader.cancel()


class TxBuilder:
    """Builds signed transactions for one tenant and chain; expires_at = committed head + margin."""

    def __init__(self, conn: Conn, tenant: int, margin: int = 1000):
        self.conn, self.tenant, self.margin = conn, tenant, margin
        self._head = None
        self._head_at = 0.0

    async def height(self) -> int:
        if self._head is None or time.monotonic() - self._head_at > 5:
            self._head = (await self.conn.head())["height"]
            self._head_at = time.monotonic()
        return self._head

    async def make(self, txbody, *signers, event_id=None, expires_at=None, chain_id=None, tenant=None):
        """(event_id, Transaction)."""
        if expires_at is None:
            expires_at = await self.height() + self.margin
        event_id = event_id or new_event_id()
        p = payload(self.conn.chain_id if chain_id is None else chain_id,
                    self.tenant if tenant is None else tenant, event_id, expires_at, txbody)
        return event_id, sign_tx(p, *signers)
