#!/usr/bin/python3
"""Conformance test of a Hoard gateway against docs/PROTOCOL.md (protocol version 1).

    /usr/bin/python3 conformance.py --url ws://127.0.0.1:PORT/v1 --tenant N --studio-seed HEX

Every step asserts what PROTOCOL.md says, nothing more: a FAIL means the gateway and its document
disagree (or this client misread the document). One line per step, then `steps=N failures=F`;
exit status 0 only when F = 0. Names, keys and item ids are fresh per run, so it can run again
against the same stack. Not covered here: rate limits (configuration), slow readers (1013) and
shutdown (1001), which need load or a stopped gateway.
"""
import argparse
import asyncio
import os
import sys
import threading
import time
import traceback
import warnings

import websockets

from hoard_client import (TX_DOMAIN, Closed, Conn, HoardError, Keypair, TxBuilder, amount, amount_int,
                          asset_currency, asset_item, auth_signature, body, grant_currency, grant_stack,
                          grant_unique, new_event_id, now_ms, pack, payload, pretty, session_token,
                          session_token_message, settle_event_id, sign_tx, swap_side,
                          verify)

OVERALL_TIMEOUT_S = 240
COMMIT_TIMEOUT_S = 30

RESULTS = []


def check(name, ok, detail=""):
    ok = bool(ok)
    RESULTS.append((name, ok))
    text = detail if isinstance(detail, str) else pretty(detail, limit=1200)
    if ok and len(text) > 200:
        text = text[:200] + "..."
    print(("PASS " if ok else "FAIL ") + name + (f" -- {text}" if text else ""), flush=True)
    return ok


def short(x, n=600):
    return pretty(x, limit=n)


async def try_submit_and_wait(conn, tx, timeout=COMMIT_TIMEOUT_S):
    """`Conn.submit_and_wait`: (answer, outcome), or (the error's repr, None) when either fails."""
    try:
        return await conn.submit_and_wait(tx, timeout)
    except Exception as e:  # noqa: BLE001
        return repr(e), None


def applied(m):
    return m is not None and m[0] == "committed" and m[1].get("outcome") == "applied"


def is_rejected(m, *reasons):
    return m is not None and m[0] == "rejected" and m[1].get("reason") in reasons


async def expect_error(conn, name, code, **fields):
    """Send a request that must be answered with error{code}: (ok, what came back)."""
    try:
        m = await conn.request(name, **fields)
        return False, m
    except HoardError as e:
        return e.code == code, ("error", e.body)
    except Closed as e:
        return False, ("<closed>", (e.code, e.reason))
    except asyncio.TimeoutError:
        return False, ("<timeout>", None)


async def expect_submit_error(conn, tx, code):
    return await expect_error(conn, "submit", code, tx=tx)


async def still_open(conn):
    try:
        return (await conn.request("ping", timeout=5))[0] == "pong"
    except Exception:  # noqa: BLE001
        return False


async def poll(read, done, timeout=10.0, interval=0.05):
    """Repeat a read until done(value) (for state no push announces); returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = await read()
        if done(v) or time.monotonic() > deadline:
            return v
        await asyncio.sleep(interval)


def balances_map(b):
    return {c: amount_int(a) for c, a in b["balances"]}


def mentions(obj, key: bytes):
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj) == key
    if isinstance(obj, dict):
        return any(mentions(v, key) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(mentions(v, key) for v in obj)
    return False


# field names of TxBody variants, Grant/Asset variants and SwapSide as the gateway sends them (2.1)
BODY_FIELDS = {"register_account": {"account", "custody"}, "define_currency": {"currency", "decimals", "max_supply"},
               "define_item_class": {"class", "stackable", "max_supply", "metadata_hash"},
               "mint": {"to", "grant"}, "transfer": {"from", "to", "assets"}, "burn": {"from", "assets"},
               "split": {"owner", "item", "quantity", "new_item"}, "merge": {"owner", "into", "from"},
               "swap": {"left", "right"}, "settle": {"entries"}}
VARIANT_FIELDS = {"currency": {"currency", "amount"}, "unique": {"class", "item", "attributes_hash"},
                  "stack": {"class", "item", "quantity"}, "item": {"item"}}


def body_shape_errors(txbody):
    errs = []
    if not (isinstance(txbody, dict) and len(txbody) == 1):
        return [("body", txbody)]
    (v, f), = txbody.items()
    if v not in BODY_FIELDS or not isinstance(f, dict) or set(f) != BODY_FIELDS[v]:
        return [(v, f if not isinstance(f, dict) else sorted(f))]
    variants = []
    if v == "mint":
        variants.append(f["grant"])
    if v in ("transfer", "burn"):
        variants += f["assets"]
    if v == "swap":
        for side in (f["left"], f["right"]):
            if not isinstance(side, dict) or set(side) != {"account", "gives"}:
                errs.append(("swap side", side))
            else:
                variants += side["gives"]
    if v == "settle":
        for e in f["entries"]:
            if not isinstance(e, dict) or set(e) != {"to", "grant"}:
                errs.append(("settle entry", e))
            else:
                variants.append(e["grant"])
    for g in variants:
        if not (isinstance(g, dict) and len(g) == 1):
            errs.append(("variant", g))
            continue
        (gv, gf), = g.items()
        if gv not in VARIANT_FIELDS or not isinstance(gf, dict) or set(gf) != VARIANT_FIELDS[gv]:
            errs.append((gv, gf))
    return errs


class Suite:
    def __init__(self, url, tenant, studio_seed):
        self.url, self.T = url, tenant
        self.studio = Keypair.from_seed_hex(studio_seed)
        run = os.urandom(3).hex()
        self.GEM = "GEM" + run.upper()
        self.SWORD = "sword-" + run
        self.POTION = "potion-" + run
        self.CNT = "clk-" + run
        self.iid = int.from_bytes(os.urandom(5), "big") << 12
        self.conns = []
        self.A, self.B, self.C, self.U = Keypair(), Keypair(), Keypair(), Keypair()
        self.expected_gem = {}
        self.unremembered = set()  # event ids whose first delivery was a non-member rejection
        self.settle_ids = []

    async def open(self):
        c = await Conn.open(self.url)
        self.conns.append(c)
        return c

    async def studio_conn(self):
        c = await self.open()
        await c.auth_studio(self.T, self.studio)
        return c

    async def player_conn(self, key: Keypair, ttl_ms=3_600_000):
        c = await self.open()
        await c.auth_player(session_token(self.studio, self.T, key.public, now_ms() + ttl_ms))
        return c

    async def gem(self, conn, who):
        return balances_map(await conn.call("balances", account=who.public)).get(self.GEM, 0)

    # ------------------------------------------------------------------ 1, 3: connection, auth
    async def connect(self):
        self.idle = await self.open()  # never authenticates: closed with 1008 after 10 s (checked at the end)
        s = self.s = await self.open()
        h = s.hello
        check("hello on open: protocol_version 1, 32-byte challenge, limits as in section 6",
              h.get("protocol_version") == 1 and isinstance(h.get("challenge"), bytes) and len(h["challenge"]) == 32
              and isinstance(h.get("chain_id"), int)
              and h.get("limits") == {"frame_bytes_max": 262144, "clicks_per_frame_max": 2048,
                                      "events_in_flight_max": 1024, "subscriptions_max": 16, "open_offers_max": 16},
              short(h))
        a = await s.auth_studio(self.T, self.studio)
        check("auth_studio (challenge signed by the studio key) -> authenticated {role: studio, tenant}",
              a.get("role") == "studio" and a.get("tenant") == self.T, short(a))
        pong = await s.call("ping")
        check("ping -> pong {request_id, server_unix_ms}",
              isinstance(pong.get("server_unix_ms"), int) and abs(pong["server_unix_ms"] - now_ms()) < 60_000, short(pong))
        hd = await s.head()
        check("head -> {chain_id = hello's, height, 32-byte block_hash and state_root, timestamp_ms}",
              hd.get("chain_id") == s.chain_id and isinstance(hd.get("height"), int)
              and len(hd.get("block_hash", b"")) == 32 and len(hd.get("state_root", b"")) == 32
              and isinstance(hd.get("timestamp_ms"), int), short(hd))
        self.tb = TxBuilder(s, self.T)

    # ------------------------------------------------------------------ 2.1: definitions and accounts
    async def setup(self):
        s, tb, st = self.s, self.tb, self.studio
        A, B, C = self.A, self.B, self.C
        plan = [("GOLD", body("define_currency", "GOLD", 0, amount(10 ** 30))),
                ("GEM", body("define_currency", self.GEM, 2, amount(10 ** 12))),
                ("sword", body("define_item_class", self.SWORD, False, amount(1000), b"\x11" * 32)),
                ("potion", body("define_item_class", self.POTION, True, amount(10 ** 9), b"\x22" * 32)),
                ("A", body("register_account", A.public, "custodial")),
                ("B", body("register_account", B.public, "self_custody")),
                ("C", body("register_account", C.public, "self_custody"))]
        txs = {label: await tb.make(b, st) for label, b in plan}
        accs = await asyncio.gather(*[s.submit(tx) for _, tx in txs.values()])
        check("pipelined submits -> accepted {request_id, event_id} each, with the transaction's event id",
              [a.get("event_id") for a in accs] == [ev for ev, _ in txs.values()], short(accs))
        outs = {label: await s.outcome(ev, COMMIT_TIMEOUT_S) for label, (ev, _) in txs.items()}
        check("define_currency / define_item_class (studio-signed) -> committed {event_id, height, outcome: applied}",
              all(applied(outs[x]) and isinstance(outs[x][1].get("height"), int) for x in ("GEM", "sword", "potion")),
              short({x: outs[x] for x in ("GEM", "sword", "potion")}))
        check("define_currency GOLD -> applied, or rejected {reason: currency_exists} if an earlier run defined it",
              applied(outs["GOLD"]) or is_rejected(outs["GOLD"], "currency_exists"), short(outs["GOLD"]))
        check("register_account custodial and self_custody (studio-signed) -> applied",
              all(applied(outs[x]) for x in "ABC"), short({x: outs[x] for x in "ABC"}))
        b = await s.call("balances", account=A.public)
        check("balances of a new custodial account -> {account, height, custody: custodial, balances: []}",
              b.get("account") == A.public and b.get("custody") == "custodial" and b.get("balances") == []
              and isinstance(b.get("height"), int), short(b))

    # ------------------------------------------------------------------ 3.2: players
    async def players(self):
        s, A, B, U, T = self.s, self.A, self.B, self.U, self.T
        tok = await s.call("issue_token", player=A.public, ttl_ms=3_600_000)
        t = tok.get("token", {})
        check("issue_token -> token {request_id, token: SessionToken signed by the studio key, ttl applied}",
              t.get("tenant") == T and t.get("player") == A.public
              and abs(t.get("expires_unix_ms", 0) - (now_ms() + 3_600_000)) < 60_000
              and verify(self.studio.public, session_token_message(T, A.public, t["expires_unix_ms"]),
                         t.get("signature", b"")), short(tok))
        pA = self.pA = await self.open()
        au = await pA.auth_player(t)
        check("auth_player (gateway-issued token) -> authenticated {role: player, account, custody: custodial}",
              au.get("role") == "player" and au.get("tenant") == T and au.get("account") == A.public
              and au.get("custody") == "custodial", short(au))
        pB = self.pB = await self.open()
        au = await pB.auth_player(session_token(self.studio, T, B.public, now_ms() + 3_600_000))
        check("auth_player (token signed offline) -> custody: self_custody",
              au.get("role") == "player" and au.get("account") == B.public and au.get("custody") == "self_custody",
              short(au))
        self.pC = await self.player_conn(self.C)
        pU = self.pU = await self.open()
        au = await pU.auth_player(session_token(self.studio, T, U.public, now_ms() + 600_000))
        check("auth_player of an unregistered account -> custody nil",
              au.get("account") == U.public and au.get("custody") is None, short(au))

    # ------------------------------------------------------------------ 4.6: subscriptions (set up early)
    async def subscribe(self):
        s, pB = self.s, self.pB
        sub = await s.call("subscribe", account=None)
        self.sub_all = sub.get("subscription_id")
        self.s_mark = len(s.log)
        check("studio subscribe {account: nil} -> subscribed {request_id, subscription_id}",
              isinstance(self.sub_all, int), short(sub))
        sub = await pB.call("subscribe", account=self.B.public)
        self.sub_B = sub.get("subscription_id")
        check("player subscribe {account: itself} -> subscribed", isinstance(self.sub_B, int), short(sub))
        ok, ans = await expect_error(pB, "subscribe", "forbidden", account=self.A.public)
        check("player subscribe {account: another} -> forbidden", ok, short(ans))
        ok, ans = await expect_error(pB, "subscribe", "forbidden", account=None)
        check("player subscribe {account: nil} -> forbidden", ok, short(ans))

    # ------------------------------------------------------------------ 4.2: clicks
    async def clicks(self):
        s, pA, CNT = self.s, self.pA, self.CNT
        A, B, C, U = (k.public for k in (self.A, self.B, self.C, self.U))
        V, W = Keypair().public, Keypair().public

        async def refused(conn, seq, clicks, code):
            mark = len(conn.log)
            await conn.send("clicks", {"request_id": seq, "clicks": clicks})

            def pred(m):
                if m[0] == "error" and m[1].get("request_id") == seq:
                    return True
                return m[0] == "clicks_ack" and m[1].get("up_to", -1) >= seq and any(m is x for x in conn.log[mark:])
            try:
                m = await conn.wait(pred, timeout=10)
            except (asyncio.TimeoutError, Closed) as e:
                return False, repr(e)
            return m[0] == "error" and m[1].get("code") == code, m

        seq1 = pA.rid()
        ack = await pA.clicks([[A, CNT, 150]], seq=seq1)
        check("clicks (player, its own key) -> clicks_ack {up_to >= request_id}", ack.get("up_to", -1) >= seq1,
              short(ack))
        seqs = []
        for i in range(3):
            seqs.append(s.rid())
            await s.send("clicks", {"request_id": seqs[-1], "clicks": [[B, CNT, 100], [C, CNT, 40 + i], [U, CNT, 250]]})
        ack = await s.clicks_result(seqs[-1])
        check("pipelined clicks (studio, several players per message) -> cumulative clicks_ack",
              ack.get("up_to", -1) >= seqs[-1], short(ack))
        seq = s.rid()
        ack = await s.clicks([[V, CNT, 1000000]] + [[W, CNT, 1]] * 2047, seq=seq)
        check("clicks at the limits (2048 entries, count 1000000) -> acked", ack.get("up_to", -1) >= seq, short(ack))

        ok, m = await refused(pA, seq1 + 500, [[A, CNT, 7], [B, CNT, 1]], "forbidden")
        check("player clicks including another player -> forbidden (whole message)", ok, short(m))
        ok, m = await refused(pA, seq1, [[A, CNT, 1]], "invalid")
        check("clicks request_id not greater than the previous accepted one -> invalid", ok, short(m))
        ok, m = await refused(pA, seq1 + 1000, [[A, CNT, 0]], "invalid")
        check("clicks count 0 -> invalid", ok, short(m))
        try:
            ack = await pA.clicks([[A, CNT, 1]], seq=seq1 + 1)
            ok = ack.get("up_to", -1) >= seq1 + 1
        except Exception as e:  # noqa: BLE001
            ok, ack = False, repr(e)
        check("a refused clicks message does not count: request_id between the last accepted and a refused one "
              "-> acked", ok, short(ack))
        pA.reserve_rids(seq1 + 2000)
        for label, clicks, code in [("no entries", [], "invalid"),
                                    ("2049 entries", [[A, CNT, 1]] * 2049, "too_large"),
                                    ("a count of 0 among valid entries", [[A, CNT, 5], [A, CNT, 0]], "invalid"),
                                    ("count 1000001", [[A, CNT, 1000001]], "invalid"),
                                    ("counter name with capitals and '!'", [[A, "Gold!", 1]], "invalid"),
                                    ("counter name of 33 bytes", [[A, "a" * 33, 1]], "invalid")]:
            ok, m = await refused(pA, pA.rid(), clicks, code)
            check(f"clicks with {label} -> {code}, nothing counted", ok, short(m))
        ack = await pA.clicks([[A, CNT, 1]])
        check("the connection still accepts clicks after refused ones", ack.get("up_to", -1) >= pA.next_rid, short(ack))
        s2 = self.s2 = await self.studio_conn()
        await s2.send("clicks", {"request_id": 0, "clicks": [[C, CNT, 5]]})
        try:
            m = await s2.wait(lambda m: m[0] in ("clicks_ack", "error"), timeout=10)
        except Exception as e:  # noqa: BLE001
            m = ("<none>", {"e": repr(e)})
        check("a connection's first clicks may have request_id 0 -> clicks_ack {up_to: 0}",
              m[0] == "clicks_ack" and m[1].get("up_to") == 0, short(m))

        want = {A: 152, B: 300, C: 128, U: 750, V: 1000000, W: 2047}
        total = sum(want.values())
        cnt = await poll(lambda: s.call("counter", counter=CNT, player=A),
                         lambda v: v.get("total") == total and v.get("player_total") == want[A], timeout=10)
        check("counter {counter, player} -> {total, player_total}: exactly the acked clicks (counter reads lag "
              "at most one flush)", cnt.get("counter") == CNT and cnt.get("total") == total
              and cnt.get("player_total") == want[A], f"want total {total}, A {want[A]}; got {short(cnt)}")
        cnt = await s.call("counter", counter=CNT, player=None)
        check("counter {player: nil} -> tenant total, player_total nil",
              cnt.get("total") == total and cnt.get("player_total") is None, short(cnt))
        pt = await s.call("player_totals", player=B)
        check("player_totals -> {player, totals: [(counter, total)]}",
              pt.get("player") == B and pt.get("totals") == [[CNT, 300]], short(pt))
        ranking = sorted(want.items(), key=lambda kv: -kv[1])
        lb = await s.call("leaderboard", counter=CNT, limit=3)
        check("leaderboard {limit: 3} -> the 3 highest, highest first",
              lb.get("counter") == CNT and lb.get("entries") == [list(kv) for kv in ranking[:3]], short(lb))
        lb = await s.call("leaderboard", counter=CNT, limit=100)
        check("leaderboard {limit: 100} -> every player of the counter, highest first",
              lb.get("entries") == [list(kv) for kv in ranking], short(lb))
        for lim in (0, 101):
            ok, ans = await expect_error(s, "leaderboard", "invalid", counter=CNT, limit=lim)
            check(f"leaderboard limit {lim} -> invalid", ok, short(ans))
        ok, ans = await expect_error(pA, "leaderboard", "forbidden", counter=CNT, limit=3)
        check("player leaderboard -> forbidden", ok, short(ans))
        own = await pA.call("counter", counter=CNT, player=A)
        check("player reads its own counter", own.get("player_total") == want[A], short(own))
        ok, ans = await expect_error(pA, "counter", "forbidden", counter=CNT, player=B)
        check("player reads another player's counter -> forbidden", ok, short(ans))
        ok, ans = await expect_error(pA, "counter", "forbidden", counter=CNT, player=None)
        check("player reads the tenant total (counter {player: nil}) -> forbidden (reads: only itself)", ok, short(ans))
        ok, ans = await expect_error(pA, "player_totals", "forbidden", player=B)
        check("player player_totals of another -> forbidden", ok, short(ans))

    # ------------------------------------------------------------------ 2.1, 4.3: asset events
    async def assets(self):
        s, pA, pB, st, tb, iid = self.s, self.pA, self.pB, self.studio, self.tb, self.iid
        A, B, C, GEM = self.A, self.B, self.C, self.GEM
        tbA, tbB = TxBuilder(pA, self.T), TxBuilder(pB, self.T)
        mints = [("GEM->A", body("mint", A.public, grant_currency(GEM, 1000))),
                 ("GEM->B", body("mint", B.public, grant_currency(GEM, 1000))),
                 ("GEM->C", body("mint", C.public, grant_currency(GEM, 1000))),
                 ("sword->A", body("mint", A.public, grant_unique(self.SWORD, iid + 1, b"\x33" * 32))),
                 ("sword->C", body("mint", C.public, grant_unique(self.SWORD, iid + 5, b"\x34" * 32))),
                 ("potion->B", body("mint", B.public, grant_stack(self.POTION, iid + 2, 10)))]
        txs = {label: await tb.make(b, st) for label, b in mints}
        await asyncio.gather(*[s.submit(tx) for _, tx in txs.values()])
        outs = {label: await s.outcome(ev, COMMIT_TIMEOUT_S) for label, (ev, _) in txs.items()}
        self.mint_push = outs["GEM->A"]
        self.mint_ev = txs["GEM->A"][0]
        self.b_events = {txs["GEM->B"][0], txs["potion->B"][0]}
        check("mint currency, unique item, stack -> applied", all(applied(o) for o in outs.values()), short(outs))

        _, tx = await tb.make(body("transfer", A.public, B.public, [asset_currency(GEM, 100), asset_item(iid + 1)]), st)
        _, out = await s.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        self.b_events.add(out[1]["event_id"])
        check("transfer from a custodial account, signed by the studio -> applied", applied(out), short(out))
        _, tx = await tbB.make(body("transfer", B.public, C.public, [asset_currency(GEM, 50)]), B)
        _, out = await pB.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        self.b_events.add(out[1]["event_id"])
        check("self-custodied player submits its own transfer, signed by itself -> applied", applied(out), short(out))

        # 3.3: a custodial player's own signature is accepted by the gateway, then the ledger: missing_signature (final)
        ev, tx = await tbA.make(body("transfer", A.public, B.public, [asset_currency(GEM, 1)]), A)
        acc, out = await try_submit_and_wait(pA, tx, COMMIT_TIMEOUT_S)
        check("custodial player submits its own transfer signed by itself -> accepted, then rejected "
              "{reason: missing_signature}", is_rejected(out, "missing_signature"), f"{short(acc)} {short(out)}")
        es = await s.call("event_status", event_id=ev)
        check("event_status of that rejection (signed by a member: final) -> committed, same height, outcome rejected",
              out is not None and es.get("state") == "committed" and es.get("height") == out[1].get("height")
              and es.get("outcome") == {"rejected": {"reason": "missing_signature"}}, short(es))
        _, tx2 = await tb.make(body("transfer", A.public, B.public, [asset_currency(GEM, 1)]), st, event_id=ev)
        acc2, out2 = await try_submit_and_wait(s, tx2, 15)
        check("the same event id with a different (studio-signed, valid) transaction -> accepted, then the original "
              "rejected outcome; the new transaction is ignored",
              isinstance(acc2, dict) and acc2.get("event_id") == ev and out is not None
              and is_rejected(out2, "missing_signature") and out2[1].get("height") == out[1].get("height"),
              f"{short(acc2)} {short(out2)}")

        _, tx = await tbA.make(body("transfer", A.public, B.public, [asset_currency(GEM, 1)]), st)
        ok, ans = await expect_submit_error(pA, tx, "forbidden")
        check("player submits a transaction not signed by itself -> forbidden", ok, short(ans))
        _, tx = await tbB.make(body("transfer", A.public, B.public, [asset_currency(GEM, 1)]), B)
        ok, ans = await expect_submit_error(pB, tx, "forbidden")
        check("player submits a transfer from another account -> forbidden", ok, short(ans))
        _, tx = await tbB.make(body("mint", B.public, grant_currency(GEM, 1)), B)
        ok, ans = await expect_submit_error(pB, tx, "forbidden")
        check("player submits a mint -> forbidden", ok, short(ans))

        _, tx = await tbB.make(body("burn", B.public, [asset_currency(GEM, 10)]), B)
        _, out = await pB.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        self.b_events.add(out[1]["event_id"])
        check("burn (self-custodied player, self-signed) -> applied", applied(out), short(out))
        _, tx = await tbB.make(body("split", B.public, iid + 2, amount(3), iid + 3), B)
        _, out = await pB.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        self.b_events.add(out[1]["event_id"])
        check("split a stack of 10 into 7 + 3 -> applied", applied(out), short(out))
        inv = await pB.call("inventory", account=B.public)
        items = {i: it for i, it in inv.get("items", [])}
        q = {i: amount_int(items[i]["kind"]["stack"]["quantity"]) for i in (iid + 2, iid + 3) if i in items}
        check("inventory after the split -> both stacks, quantities 7 and 3, class and owner",
              q == {iid + 2: 7, iid + 3: 3} and all(items[i]["class"] == self.POTION and items[i]["owner"] == B.public
                                                    for i in q), short(inv))
        _, tx = await tbB.make(body("merge", B.public, iid + 2, iid + 3), B)
        _, out = await pB.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        self.b_events.add(out[1]["event_id"])
        check("merge the stacks back -> applied", applied(out), short(out))
        _, tx = await tbB.make(body("burn", B.public, [asset_currency(GEM, 10 ** 9)]), B)
        _, out = await pB.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        check("ledger rejection -> push rejected {event_id, height, reason: insufficient_funds}",
              is_rejected(out, "insufficient_funds") and isinstance(out[1].get("height"), int), short(out))
        _, tx = await tb.make(body("burn", A.public, [asset_currency(GEM, 5)]), st)
        _, out = await s.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        check("burn from a custodial account, studio-signed -> applied", applied(out), short(out))

        b = await s.call("balances", account=B.public)
        check("balances -> {account, height, custody, balances: [(currency, Amount)]} with the expected amounts",
              b.get("account") == B.public and b.get("custody") == "self_custody"
              and balances_map(b).get(GEM) == 1040 and await self.gem(s, A) == 895 and await self.gem(s, C) == 1050,
              short(b))
        inv = await s.call("inventory", account=B.public)
        items = dict((i, it) for i, it in inv.get("items", []))
        check("inventory -> {account, height, items: [(ItemId, Item)]}: the transferred unique item and the merged "
              "stack of 10",
              inv.get("account") == B.public and set(items) == {iid + 1, iid + 2}
              and items[iid + 1]["kind"] == {"unique": {"attributes_hash": b"\x33" * 32}}
              and items[iid + 1]["class"] == self.SWORD
              and amount_int(items[iid + 2]["kind"]["stack"]["quantity"]) == 10, short(inv))
        it = await s.call("item", item=iid + 2)
        hist = it.get("history", [])
        kinds = [e.get("kind") for e in hist]
        check("item -> {item_id, height, item, history} oldest first: minted, split, merged",
              it.get("item_id") == iid + 2 and (it.get("item") or {}).get("owner") == B.public
              and kinds == ["minted", "split", "merged"]
              and [e["height"] for e in hist] == sorted(e["height"] for e in hist)
              and hist[0].get("from") is None and hist[0].get("to") == B.public, short(it))
        it = await s.call("item", item=iid + 999)
        check("item never minted -> item nil, history []", it.get("item") is None and it.get("history") == [], short(it))
        es = await s.call("event_status", event_id=self.mint_ev)
        check("event_status of a committed event -> committed, its height and outcome applied",
              es.get("event_id") == self.mint_ev and es.get("state") == "committed"
              and es.get("height") == self.mint_push[1]["height"] and es.get("outcome") == "applied", short(es))
        es = await s.call("event_status", event_id=new_event_id())
        check("event_status of an unknown event id -> unknown, height nil, outcome nil",
              es.get("state") == "unknown" and es.get("height") is None and es.get("outcome") is None, short(es))
        ok, ans = await expect_error(pA, "balances", "forbidden", account=B.public)
        check("player reads another account's balances -> forbidden", ok, short(ans))
        ok, ans = await expect_error(pA, "inventory", "forbidden", account=B.public)
        check("player reads another account's inventory -> forbidden", ok, short(ans))
        try:
            it = await pA.call("item", item=iid + 2)
            hd = await pA.call("head")
            es = await pA.call("event_status", event_id=self.mint_ev)
            ok = it.get("item") is not None and isinstance(hd.get("height"), int) and es.get("state") == "committed"
            detail = ""
        except HoardError as e:
            ok, detail = False, short(e.body)
        check("player reads item, head, event_status of its tenant", ok, detail)

    # ------------------------------------------------------------------ 2.1 exactly once, final rejections
    async def exactly_once(self):
        s, pB, st, tb, GEM = self.s, self.pB, self.studio, self.tb, self.GEM
        A, B, C = self.A, self.B, self.C
        ev, tx = await tb.make(body("mint", A.public, grant_currency(GEM, 7)), st)
        _, out1 = await s.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        acc2 = await s.submit(tx)
        out2 = await s.outcome_or_none(ev, 15)
        check("resubmitting a committed event -> accepted and the original outcome pushed again",
              applied(out1) and acc2.get("event_id") == ev and out2 is not None and out2[1] == out1[1],
              f"{short(out1)} {short(out2)}")
        check("the resubmitted mint was credited once", await self.gem(s, A) == 902, "")
        _, txd = await tb.make(body("mint", A.public, grant_currency(GEM, 9)), st, event_id=ev)
        acc3, out3 = await try_submit_and_wait(s, txd, 15)
        check("a committed event id with a different transaction -> accepted, the original outcome, and the "
              "transaction ignored",
              isinstance(acc3, dict) and acc3.get("event_id") == ev and out3 is not None and out3[1] == out1[1]
              and await self.gem(s, A) == 902, f"{short(acc3)} {short(out3)}")

        # in flight: same transaction -> accepted; different -> replay (pipelined so the first is in flight)
        ev, tx = await tb.make(body("mint", A.public, grant_currency(GEM, 1)), st)
        _, txd = await tb.make(body("mint", A.public, grant_currency(GEM, 2)), st, event_id=ev)
        answers = []
        for t in (tx, txd, tx):
            try:
                answers.append(("accepted", await s.submit(t)))
            except HoardError as e:
                answers.append(("error", e.body))
        out = await s.outcome(ev, COMMIT_TIMEOUT_S)
        self.dup_ev = ev
        check("the same event id in flight with a different transaction -> replay",
              answers[0][0] == "accepted" and answers[1][0] == "error" and answers[1][1].get("code") == "replay",
              short(answers))
        check("the same event id in flight with the same transaction -> accepted", answers[2][0] == "accepted",
              short(answers[2]))
        pushes = [m for m in s.log if m[0] in ("committed", "rejected") and m[1].get("event_id") == ev]
        check("an event submitted twice in flight: one outcome (every push the same), applied once",
              applied(out) and all(p[1] == out[1] for p in pushes) and await self.gem(s, A) == 903, short(pushes))

        # 2.1: a studio-signed burn from a not-yet-registered account: unknown_account is final
        P = Keypair()
        ev, tx = await tb.make(body("burn", P.public, [asset_currency(GEM, 5)]), st)
        _, o1 = await s.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        check("studio-signed burn from an unregistered account -> rejected {reason: unknown_account}",
              is_rejected(o1, "unknown_account"), short(o1))
        es = await s.call("event_status", event_id=ev)
        check("event_status of that rejection -> committed, rejected unknown_account (final: a member signed)",
              es.get("state") == "committed" and es.get("height") == o1[1].get("height")
              and es.get("outcome") == {"rejected": {"reason": "unknown_account"}}, short(es))
        _, t = await tb.make(body("register_account", P.public, "custodial"), st)
        _, o = await s.submit_and_wait(t, COMMIT_TIMEOUT_S)
        _, t = await tb.make(body("mint", P.public, grant_currency(GEM, 5)), st)
        _, o_ = await s.submit_and_wait(t, COMMIT_TIMEOUT_S)
        acc = await s.submit(tx)
        o2 = await s.outcome_or_none(ev, 15)
        es = await s.call("event_status", event_id=ev)
        gem_p = await self.gem(s, P)
        check("resubmitting it after the account is registered and funded -> accepted, the original rejection "
              "(same height), nothing burnt",
              applied(o) and applied(o_) and acc.get("event_id") == ev and o2 is not None and o2[1] == o1[1]
              and es.get("outcome") == {"rejected": {"reason": "unknown_account"}} and gem_p == 5,
              f"push {short(o2)}; event_status {short(es)}; balance {gem_p}")

        # 2.1: the same failure of a transaction no member signed leaves the event id free
        X = Keypair()
        ev, tx = await tb.make(body("transfer", B.public, C.public, [asset_currency(GEM, 1)]), X)
        self.unremembered.add(ev)
        acc, o1 = await try_submit_and_wait(s, tx, COMMIT_TIMEOUT_S)
        check("studio submits a transfer signed only by a non-member key -> accepted, then rejected "
              "(missing_signature or unauthorized)", is_rejected(o1, "missing_signature", "unauthorized"),
              f"{short(acc)} {short(o1)}")
        _, txb = await TxBuilder(pB, self.T).make(body("transfer", B.public, C.public, [asset_currency(GEM, 1)]), B,
                                                 event_id=ev)
        acc, o2 = await try_submit_and_wait(pB, txb, COMMIT_TIMEOUT_S)
        gb, gc = await self.gem(s, B), await self.gem(s, C)
        check("that event id stays free: the owner's own signed transaction with it -> accepted, applied",
              applied(o2) and gb == 1039 and gc == 1051,
              f"{short(acc)} {short(o2)}; B {gb} (want 1039), C {gc} (want 1051)")
        if o2 is not None:
            self.b_events.add(ev)

    # ------------------------------------------------------------------ 4.4: trades
    async def trades(self):
        s, pA, pB, pC, iid, GEM = self.s, self.pA, self.pB, self.pC, self.iid, self.GEM
        A, B, C = self.A, self.B, self.C
        tbA, tbB = TxBuilder(pA, self.T), TxBuilder(pB, self.T)

        ev_off, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 20)]),
                                         swap_side(C.public, [asset_item(iid + 5)])), B)
        oo = await pB.call("offer", tx=tx, ttl_ms=60_000)
        off = oo.get("offer", {})
        check("offer (self-custodied maker = left) -> offer_opened {request_id, offer: OfferInfo}",
              off.get("offer_id") == ev_off and off.get("maker") == B.public and off.get("taker") == C.public
              and off.get("tx", {}).get("payload") == tx["payload"]
              and abs(off.get("expires_unix_ms", 0) - (now_ms() + 60_000)) < 60_000, short(oo))
        rec = await pC.wait(lambda m: m[0] == "offer_received" and m[1]["offer"]["offer_id"] == ev_off, timeout=10)
        check("the connected taker gets offer_received {offer}", rec[1]["offer"].get("maker") == B.public, short(rec))
        lst = await pC.call("offers")
        check("taker lists offers -> includes the offer", any(o.get("offer_id") == ev_off for o in lst.get("offers", [])),
              short(lst))
        rid = await pC.send_request("accept", offer_id=ev_off, signature=C.sign(TX_DOMAIN + rec[1]["offer"]["tx"]["payload"]))
        got = []
        try:
            while not any(g[0] == "error" for g in got) and not (
                    any(g[0] in ("committed", "rejected") for g in got) and any(g[0] == "offer_closed" for g in got)):
                got.append(await pC.wait(lambda m: m[1].get("request_id") == rid or
                                         (m[0] in ("offer_closed", "committed", "rejected")
                                          and ev_off in (m[1].get("offer_id"), m[1].get("event_id"))),
                                         timeout=COMMIT_TIMEOUT_S))
        except asyncio.TimeoutError:
            pass
        names = [g[0] for g in got]
        acc = [g for g in got if g[0] == "accepted"]
        com = [g for g in got if g[0] in ("committed", "rejected")]
        ok = (len(acc) == 1 and acc[0][1].get("event_id") == ev_off and names.index("accepted") < names.index(com[0][0])
              and any(g[0] == "offer_closed" and g[1].get("reason") == "accepted" for g in got)
              and applied(com[0])) if acc and com else False
        check("accept (taker's signature) -> accepted {request_id, event_id: offer id}, offer_closed {accepted}, "
              "then committed applied", ok, short(got))
        if com:
            self.b_events.add(ev_off)
        mc = await pB.wait(lambda m: m[0] == "offer_closed" and m[1].get("offer_id") == ev_off, timeout=10)
        check("the maker gets offer_closed {reason: accepted}", mc[1].get("reason") == "accepted", short(mc))
        it = await s.call("item", item=iid + 5)
        check("the swap applied: the item is the maker's, its last history entry swapped",
              (it.get("item") or {}).get("owner") == B.public and it["history"][-1].get("kind") == "swapped",
              short(it))

        ev_off2, tx = await tbA.make(body("swap", swap_side(A.public, [asset_currency(GEM, 5)]),
                                          swap_side(B.public, [asset_currency(GEM, 3)])))
        oo = await pA.call("offer", tx=tx, ttl_ms=60_000)
        sigs = oo.get("offer", {}).get("tx", {}).get("signatures", [])
        check("offer by a custodial maker without a signature -> offer_opened, the gateway adds the studio's signature",
              any(x.get("signer") == self.studio.public and verify(self.studio.public, TX_DOMAIN + tx["payload"],
                                                                   x.get("signature", b"")) for x in sigs), short(oo))
        await pB.wait(lambda m: m[0] == "offer_received" and m[1]["offer"]["offer_id"] == ev_off2, timeout=10)
        rid = await pB.send_request("accept", offer_id=ev_off2, signature=B.sign(TX_DOMAIN + tx["payload"]))
        out = await pB.wait(lambda m: (m[0] in ("committed", "rejected") and m[1].get("event_id") == ev_off2)
                            or (m[0] == "error" and m[1].get("request_id") == rid), timeout=COMMIT_TIMEOUT_S)
        self.b_events.add(ev_off2)
        check("accept of a custodial maker's offer -> committed applied", applied(out), short(out))

        ev_off3, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 1)]),
                                          swap_side(C.public, [asset_currency(GEM, 1)])), B)
        await pB.call("offer", tx=tx, ttl_ms=60_000)
        rid = await pB.send_request("cancel", offer_id=ev_off3)
        m = await pB.wait(lambda m: (m[0] == "offer_closed" and m[1].get("offer_id") == ev_off3)
                          or m[1].get("request_id") == rid, timeout=10)
        check("maker cancels -> push offer_closed {offer_id, reason: cancelled}",
              m[0] == "offer_closed" and m[1].get("reason") == "cancelled", short(m))
        ok, ans = await expect_error(pC, "accept", "not_found", offer_id=ev_off3, signature=C.sign(TX_DOMAIN + tx["payload"]))
        check("accept of a cancelled offer -> not_found", ok, short(ans))

        ev_off4, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 1)]),
                                          swap_side(C.public, [asset_currency(GEM, 1)])), B)
        await pB.call("offer", tx=tx, ttl_ms=300)
        try:
            m = await pB.wait(lambda m: m[0] == "offer_closed" and m[1].get("offer_id") == ev_off4, timeout=10)
        except asyncio.TimeoutError:
            m = None
        check("an offer whose ttl runs out -> offer_closed {reason: expired}",
              m is not None and m[1].get("reason") == "expired", short(m))
        ok, ans = await expect_error(s, "offer", "forbidden", tx=tx, ttl_ms=1000)
        check("studio offer -> forbidden", ok, short(ans))
        ok, ans = await expect_error(s, "accept", "forbidden", offer_id=new_event_id(), signature=None)
        check("studio accept -> forbidden", ok, short(ans))
        for ttl in (0, 86_400_001):
            _, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 1)]),
                                        swap_side(C.public, [asset_currency(GEM, 1)])), B)
            ok, ans = await expect_error(pB, "offer", "invalid", tx=tx, ttl_ms=ttl)
            check(f"offer ttl_ms {ttl} (outside 1 ms to 24 h) -> invalid", ok, short(ans))

        ev_off5, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 2)]),
                                          swap_side(A.public, [asset_currency(GEM, 1)])), B)
        await pB.call("offer", tx=tx, ttl_ms=60_000)
        await pA.wait(lambda m: m[0] == "offer_received" and m[1]["offer"]["offer_id"] == ev_off5, timeout=10)
        rid = await pA.send_request("accept", offer_id=ev_off5, signature=None)
        out = await pA.wait(lambda m: (m[0] in ("committed", "rejected") and m[1].get("event_id") == ev_off5)
                            or (m[0] == "error" and m[1].get("request_id") == rid), timeout=COMMIT_TIMEOUT_S)
        self.b_events.add(ev_off5)
        check("custodial taker accepts with signature nil (the gateway signs) -> committed applied", applied(out),
              short(out))
        ga, gb, gc = await self.gem(s, A), await self.gem(s, B), await self.gem(s, C)
        check("swaps applied whole: balances after three trades", (ga, gb, gc) == (902, 1020, 1071),
              f"A {ga} B {gb} C {gc}, want 902 1020 1071")

        ev_off6, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 1)]),
                                          swap_side(C.public, [asset_currency(GEM, 1)])), B)
        await pB.call("offer", tx=tx, ttl_ms=60_000)
        ok, ans = await expect_error(pC, "accept", "bad_signature", offer_id=ev_off6, signature=bytes(64))
        check("accept with a signature that does not verify -> bad_signature", ok, short(ans))
        rid = await pC.send_request("cancel", offer_id=ev_off6)
        m = await pC.wait(lambda m: (m[0] == "offer_closed" and m[1].get("offer_id") == ev_off6)
                          or m[1].get("request_id") == rid, timeout=10)
        ok, ans = await expect_error(pC, "accept", "not_found", offer_id=ev_off6, signature=C.sign(TX_DOMAIN + tx["payload"]))
        check("the taker may cancel -> offer_closed {cancelled}; the offer is gone",
              m[0] == "offer_closed" and m[1].get("reason") == "cancelled" and ok, f"{short(m)} {short(ans)}")

        opened, err = 0, None
        for _ in range(17):
            _, tx = await tbB.make(body("swap", swap_side(B.public, [asset_currency(GEM, 1)]),
                                        swap_side(C.public, [asset_currency(GEM, 1)])), B)
            try:
                await pB.call("offer", tx=tx, ttl_ms=120_000)
                opened += 1
            except HoardError as e:
                err = e.body
                break
        check("at most 16 open offers per maker: the 17th -> busy with retry_after_ms",
              opened == 16 and err is not None and err.get("code") == "busy"
              and isinstance(err.get("retry_after_ms"), int), f"opened {opened}, then {short(err)}")

    # ------------------------------------------------------------------ 4.5: settlement
    async def settlement(self):
        s, st, tb = self.s, self.studio, self.tb
        S = Keypair()
        _, tx = await tb.make(body("register_account", S.public, "custodial"), st)
        _, out = await s.submit_and_wait(tx, COMMIT_TIMEOUT_S)
        points, got, answers = 0, None, []
        for _ in range(4):
            await s.clicks([[S.public, "gold", 250]])
            points += 250
            await poll(lambda: s.call("counter", counter="gold", player=S.public),
                       lambda v: v.get("player_total") == points, timeout=10)
            st_ = await s.call("settle")
            answers.append(st_)
            if st_.get("entries"):
                got = st_
                break
        ok_types = all(isinstance(a.get("window"), int) and isinstance(a.get("entries"), int)
                       and isinstance(a.get("event_ids"), list) and all(len(e) == 16 for e in a["event_ids"])
                       for a in answers)
        check("settle -> settlement {request_id, window: u64, event_ids: [EventId], entries: u32}", ok_types,
              short(answers))
        windows = [a.get("window") for a in answers if isinstance(a.get("window"), int)]
        check("window numbers are the cut's clock in microseconds (over 1.6e15), increasing, below 2^53",
              len(windows) == len(answers) and all(1_600_000_000_000_000 < w < 2 ** 53 for w in windows)
              and all(b > a for a, b in zip(windows, windows[1:])), short(windows))
        check("a window holding one paid player -> entries 1, one event id (one chunk)",
              got is not None and got["entries"] == 1 and len(got["event_ids"]) == 1,
              f"{short(answers)} (the gateway's own interval may take a window first; 4 tries)")
        check("settlement event ids = EventId::derive(['hoard/settle/v1', tenant, window, chunk])",
              all(a["event_ids"] == [settle_event_id(self.T, a["window"], i) for i in range(len(a["event_ids"]))]
                  for a in answers), short(answers))
        if got:
            ev = got["event_ids"][0]
            self.settle_ids.append(ev)
            try:
                act = await s.wait(lambda m: m[0] == "activity" and m[1].get("event_id") == ev, timeout=COMMIT_TIMEOUT_S,
                                   consume=False)
            except asyncio.TimeoutError:
                act = None
            entries = ((act or ("", {}))[1].get("body") or {}).get("settle", {}).get("entries", [])
            check("the settle transaction shows on the tenant subscription: settle entries to the player in GOLD, "
                  "outcome settled",
                  act is not None and len(entries) == 1 and entries[0].get("to") == S.public
                  and entries[0].get("grant", {}).get("currency", {}).get("currency") == "GOLD"
                  and act[1].get("outcome") == {"settled": {"entries": [None]}}, short(act))
            es = await s.call("event_status", event_id=ev)
            check("event_status of the settle event -> committed, settled",
                  es.get("state") == "committed" and es.get("outcome") == {"settled": {"entries": [None]}}, short(es))
        else:
            check("the settle transaction shows on the tenant subscription", False, "no window with entries")
            check("event_status of the settle event", False, "no window with entries")
        gold = await poll(lambda: s.call("balances", account=S.public),
                          lambda v: balances_map(v).get("GOLD", 0) >= points // 100, timeout=15, interval=0.1)
        check("every 100 gold points become 1 GOLD (remainders stay unsettled)",
              balances_map(gold).get("GOLD", 0) == points // 100, f"points {points}, {short(gold)}")

    # ------------------------------------------------------------------ 4.6: pushes
    async def subscriptions(self):
        s, s2, pB = self.s, self.s2, self.pB
        expected = {}
        for m in s.log[self.s_mark:]:
            if m[0] in ("committed", "rejected") and m[1]["event_id"] not in self.unremembered:
                expected.setdefault(m[1]["event_id"], m)
        missing, wrong = [], []
        deadline = time.monotonic() + 15
        for ev, m in expected.items():
            try:
                a = await s.wait(lambda x, ev=ev: x[0] == "activity" and x[1].get("event_id") == ev,
                                 timeout=max(0.1, deadline - time.monotonic()), consume=False)
            except asyncio.TimeoutError:
                missing.append(ev)
                continue
            want = m[1]["outcome"] if m[0] == "committed" else {"rejected": {"reason": m[1]["reason"]}}
            if a[1].get("height") != m[1]["height"] or a[1].get("outcome") != want or \
                    a[1].get("subscription_id") != self.sub_all:
                wrong.append((m, a))
        check("tenant subscription: an activity {subscription_id, height, event_id, body, outcome} for every "
              "committed event, same height and outcome as the committed/rejected push",
              not missing and not wrong and len(expected) > 10,
              f"{len(expected)} events; missing {short(missing)}; differing {short(wrong)}")
        acts = [m for m in s.log if m[0] == "activity" and m[1].get("subscription_id") == self.sub_all]
        hs = [m[1]["height"] for m in acts]
        check("activity pushes come in commit order", hs == sorted(hs), short(hs))
        bad = [(m[1]["event_id"], e) for m in acts for e in body_shape_errors(m[1].get("body"))]
        check("activity bodies: one-entry TxBody map, structs as maps with the field names of 2.1", not bad, short(bad))
        deadline = time.monotonic() + 15
        for ev in self.b_events:
            try:
                await pB.wait(lambda x, ev=ev: x[0] == "activity" and x[1].get("event_id") == ev,
                              timeout=max(0.1, deadline - time.monotonic()), consume=False)
            except asyncio.TimeoutError:
                pass
        bacts = [m for m in pB.log if m[0] == "activity"]
        seen = {m[1]["event_id"] for m in bacts}
        foreign = [m for m in bacts if not mentions(m[1].get("body"), self.B.public)]
        check("account subscription: every event touching the account (sender, receiver, owner, swap side), "
              "nothing else", self.b_events <= seen and not foreign and all(
                  m[1].get("subscription_id") == self.sub_B for m in bacts),
              f"missing {short(self.b_events - seen)}; foreign {short(foreign)}")

        live = [m[1]["event_id"] for m in acts]
        first_h = hs[0] if hs else 1
        sub = await s2.call("subscribe", account=None, from_height=first_h)
        try:
            await s2.wait(lambda x: x[0] == "activity" and live and x[1].get("event_id") == live[-1], timeout=15,
                          consume=False)
        except asyncio.TimeoutError:
            pass
        rep = [m[1]["event_id"] for m in s2.log if m[0] == "activity"]
        check("subscribe {from_height: h} replays every retained event at heights >= h, then live: no gap, "
              "no overlap", rep[:len(live)] == live
              and len(set(e for e in rep if e not in self.unremembered)) == len([e for e in rep if e not in self.unremembered]),
              f"replayed {len(rep)}, live saw {len(live)}; first difference at "
              f"{next((i for i, (x, y) in enumerate(zip(rep, live)) if x != y), None)}: "
              f"replay {short([(m[1]['height'], m[1]['event_id']) for m in s2.log if m[0] == 'activity'][:40], 1500)} "
              f"live {short([(m[1]['height'], m[1]['event_id']) for m in acts][:40], 1500)}")
        idx = [i for i, m in enumerate(s2.log) if m[0] in ("subscribed", "activity")]
        check("subscribed comes before the first activity", idx and s2.log[idx[0]][0] == "subscribed", "")
        u = await s2.call("unsubscribe", subscription_id=sub["subscription_id"])
        check("unsubscribe -> unsubscribed {request_id, subscription_id}",
              u.get("subscription_id") == sub["subscription_id"], short(u))
        ok, ans = await expect_error(s2, "unsubscribe", "not_found", subscription_id=sub["subscription_id"])
        check("unsubscribe of an unknown subscription -> not_found", ok, short(ans))
        n, err = 0, None
        for _ in range(17):
            try:
                await s2.call("subscribe", account=self.A.public)
                n += 1
            except HoardError as e:
                err = e.body
                break
        check("at most 16 subscriptions per connection: the 17th -> invalid",
              n == 16 and err is not None and err.get("code") == "invalid", f"{n} subscribed, then {short(err)}")

    # ------------------------------------------------------------------ sections 2, 3.3, 4.1: details
    async def details(self):
        s, pB, st, tb, A, B = self.s, self.pB, self.studio, self.tb, self.A, self.B
        ex1 = pack({"ping": {"request_id": 7}})
        ex2 = pack({"clicks": {"request_id": 1, "clicks": [[b"\xab" * 32, "gold", 3]]}})
        ex3 = pack({"error": {"request_id": 7, "code": "busy", "message": "x", "retry_after_ms": 50}})
        ex4 = payload(1, 1, b"\x00" * 16, 1000, body("mint", b"\x00" * 32, grant_currency("GOLD", 5)))
        check("this client's encoder reproduces the worked examples of section 7 byte for byte",
              ex1.hex() == "81a470696e6781aa726571756573745f696407"
              and ex2.hex() == "81a6636c69636b7382aa726571756573745f696401a6636c69636b739193c420" + "ab" * 32
              + "a4676f6c6403"
              and ex3.hex() == "81a56572726f7284aa726571756573745f696407a4636f6465a462757379a76d657373616765a178"
                               "ae72657472795f61667465725f6d7332"
              and ex4.hex() == "950101c410" + "00" * 16 + "cd03e881a46d696e7492c420" + "00" * 32
              + "81a863757272656e637992a4474f4c44c410" + "00" * 15 + "05", "")

        rids = []
        for name, f in [("counter", {"counter": self.CNT, "player": A.public}), ("balances", {"account": A.public}),
                        ("player_totals", {"player": B.public}), ("inventory", {"account": B.public}),
                        ("counter", {"counter": self.CNT, "player": None}), ("balances", {"account": B.public})]:
            rids.append(await s.send_request(name, **f))
        pos = []
        for r in rids:
            m = await s.answer(r)
            pos.append(next(i for i, x in enumerate(s.log) if x is m))
        check("pipelined reads (counter, balances, player_totals, inventory) are answered in request order",
              pos == sorted(pos), short(pos))

        ok, ans = await expect_error(pB, "issue_token", "forbidden", player=B.public, ttl_ms=1000)
        check("player issue_token -> forbidden", ok, short(ans))
        ok, ans = await expect_error(pB, "settle", "forbidden")
        check("player settle -> forbidden", ok, short(ans))
        ok, ans = await expect_error(s, "issue_token", "invalid", player=A.public, ttl_ms=604_800_001)
        check("issue_token with ttl_ms over 7 days -> invalid", ok, short(ans))

        ev, tx = await tb.make(body("mint", A.public, grant_currency(self.GEM, 1)), st)
        r1 = await s.send_request("submit", tx=tx)
        acc = await s.answer(r1)
        es = await s.call("event_status", event_id=ev)
        out = await s.outcome(ev, COMMIT_TIMEOUT_S)
        check("event_status right after accepted -> pending (or committed with the pushed height, if it already "
              "committed)", es.get("state") == "pending" and es.get("height") is None
              or (es.get("state") == "committed" and es.get("height") == out[1]["height"]), short(es))
        ia = next(i for i, m in enumerate(s.log) if m[0] == "accepted" and m[1].get("event_id") == ev)
        ic = next(i for i, m in enumerate(s.log) if m[0] == "committed" and m[1].get("event_id") == ev)
        check("committed comes after the connection's accepted for the event", acc and ia < ic, "")

        ev, tx = await tb.make(body("mint", A.public, grant_currency(self.GEM, 1)), st)
        r = s.rid()
        await s.send_raw(pack({"submit": [r, [tx["payload"], [[x["signer"], x["signature"]] for x in tx["signatures"]]]]}))
        m = await s.wait(lambda m: m[1].get("request_id") == r)
        out = await s.outcome(ev, COMMIT_TIMEOUT_S) if m[0] == "accepted" else m
        check("submit with every struct as an array (request, Transaction, signatures) -> accepted, applied",
              m[0] == "accepted" and applied(out), short(out))
        c = await self.open()
        t = session_token(st, self.T, B.public, now_ms() + 60_000)
        await c.send_raw(pack({"auth_player": [1, [t["tenant"], t["player"], t["expires_unix_ms"], t["signature"]]]}))
        m = await c.wait(lambda m: True, timeout=10)
        check("auth_player with the request and the token as arrays -> authenticated",
              m[0] == "authenticated" and m[1].get("account") == B.public, short(m))
        await c.close()
        bad = payload(s.chain_id, self.T, new_event_id(), (await s.head())["height"] + 100,
                      {"mint": [A.public, {"currency": [self.GEM, b"\x01" * 15]}]})
        ok, ans = await expect_submit_error(s, sign_tx(bad, st), "malformed")
        check("payload with a 15-byte Amount -> malformed", ok, short(ans))

    # ------------------------------------------------------------------ sections 1, 2, 3, 4.3, 5: errors
    async def errors(self):
        st, tb, A, T = self.studio, self.tb, self.A, self.T
        c = await self.studio_conn()
        await c.send_raw(b"\xc1")
        m = await c.wait(lambda m: m[0] == "error", timeout=10)
        check("a frame that is not MessagePack -> error {request_id: 0, code: malformed}, stays open",
              m[1].get("code") == "malformed" and m[1].get("request_id") == 0 and await still_open(c), short(m))
        await c.send_raw(pack({"frobnicate": {"request_id": 77}}))
        m = await c.wait(lambda m: m[0] == "error", timeout=10)
        check("unknown message name -> unknown_message, stays open",
              m[1].get("code") == "unknown_message" and await still_open(c), short(m))
        for label, raw, rid in [("a missing field", {"balances": {"request_id": 78}}, 78),
                                ("a 31-byte PublicKey", {"balances": {"request_id": 79, "account": b"\x01" * 31}}, 79),
                                ("a str where bin is expected",
                                 {"event_status": {"request_id": 85, "event_id": "0123456789abcdef"}}, 85)]:
            await c.send_raw(pack(raw))
            m = await c.wait(lambda m, rid=rid: m[0] == "error" or m[1].get("request_id") == rid, timeout=10)
            check(f"{label} -> malformed", m[0] == "error" and m[1].get("code") == "malformed", short(m))
        await c.send_raw(pack({"ping": {"request_id": 86}}) + b"\xc0")
        m = await c.wait(lambda m: m[0] == "error" or m[1].get("request_id") == 86, timeout=10)
        check("bytes after the message in its frame -> malformed with the message's request_id",
              m[0] == "error" and m[1].get("code") == "malformed" and m[1].get("request_id") == 86, short(m))
        await c.send_raw(pack({"balances": [87, b"\x01" * 31]}))
        m = await c.wait(lambda m: m[0] == "error" or m[1].get("request_id") == 87, timeout=10)
        check("an array body that does not decode -> malformed with request_id from its first element",
              m[0] == "error" and m[1].get("code") == "malformed" and m[1].get("request_id") == 87, short(m))
        await c.send_raw(pack({"ping": {"request_id": 83}, "head": {"request_id": 84}}))
        m = await c.wait(lambda m: m[0] == "error" or m[1].get("request_id") in (83, 84), timeout=10)
        check("a message map with two entries -> malformed", m[0] == "error" and m[1].get("code") == "malformed", short(m))
        await c.send_raw(pack({"ping": [80]}))
        m = await c.wait(lambda m: m[1].get("request_id") == 80, timeout=10)
        check("a struct as an array ({ping: [80]}) is accepted", m[0] == "pong", short(m))
        await c.send_raw(pack({"balances": [81, A.public]}))
        m = await c.wait(lambda m: m[1].get("request_id") == 81, timeout=10)
        check("balances as an array is accepted", m[0] == "balances" and m[1].get("account") == A.public, short(m))
        await c.send_raw(pack({"ping": {"request_id": 82, "zzz": 1}}))
        m = await c.wait(lambda m: m[1].get("request_id") == 82, timeout=10)
        check("unknown fields are ignored", m[0] == "pong", short(m))
        ok, ans = await expect_error(c, "auth_studio", "already_authenticated", tenant=T,
                                     signature=auth_signature(st, c.challenge, T))
        check("second authentication -> already_authenticated, stays open", ok and await still_open(c), short(ans))

        mint = body("mint", A.public, grant_currency(self.GEM, 1))
        _, tx = await tb.make(mint, st, tenant=T + 1)
        ok, ans = await expect_submit_error(c, tx, "wrong_tenant")
        check("transaction for another tenant -> wrong_tenant", ok, short(ans))
        _, tx = await tb.make(mint, st, chain_id=c.chain_id + 1)
        ok, ans = await expect_submit_error(c, tx, "invalid")
        check("transaction with another chain_id -> invalid", ok, short(ans))
        hd = (await c.head())["height"]
        _, tx = await tb.make(mint, st, expires_at=hd)
        ok, ans = await expect_submit_error(c, tx, "expired")
        check("expires_at = head -> expired", ok, short(ans))

        async def at_head(offset):
            """Submit with expires_at = head + offset while the committed head stays put (the gateway checks
            against it), retrying if a block commits meanwhile; (head, answer, outcome)."""
            for _ in range(6):
                h0 = (await c.head())["height"]
                ev, tx = await tb.make(mint, st, expires_at=h0 + offset)
                try:
                    ans = ("accepted", await c.submit(tx))
                except HoardError as e:
                    ans = ("error", e.body)
                if (await c.head())["height"] == h0:
                    break
            out = await c.outcome(ev, COMMIT_TIMEOUT_S) if ans[0] == "accepted" else None
            return h0, ans, out
        h0, ans, out = await at_head(100_001)
        check("expires_at = head + 1 + 100000 -> accepted, applied", ans[0] == "accepted" and applied(out),
              f"head {h0}: {short(ans)} {short(out)}")
        h0, ans, out = await at_head(100_002)
        check("expires_at = head + 1 + 100001 -> invalid", ans[0] == "error" and ans[1].get("code") == "invalid",
              f"head {h0}: {short(ans)}")
        h0, ans, out = await at_head(1)
        check("expires_at = head + 1 -> accepted; applied, or rejected expired if a later block takes it",
              ans[0] == "accepted" and (applied(out) or is_rejected(out, "expired")), f"head {h0}: {short(ans)} {short(out)}")

        _, tx = await tb.make(mint, st)
        tx["signatures"][0]["signature"] = bytes(64)
        ok, ans = await expect_submit_error(c, tx, "bad_signature")
        check("transaction signature that does not verify -> bad_signature", ok, short(ans))
        _, tx = await tb.make(mint)
        ok, ans = await expect_submit_error(c, tx, "bad_signature")
        check("transaction with an empty signature list -> bad_signature", ok, short(ans))
        _, tx = await tb.make(mint, *([st] * 5))
        ok, ans = await expect_submit_error(c, tx, "too_large")
        check("5 signatures -> too_large", ok, short(ans))
        _, tx = await tb.make(body("register_tenant", "evil", A.public), st)
        ok, ans = await expect_submit_error(c, tx, "forbidden")
        check("studio submits register_tenant -> forbidden", ok, short(ans))
        big = payload(c.chain_id, T, new_event_id(), (await c.head())["height"] + 100,
                      body("settle", [[A.public, grant_currency("GOLD", 1)]] * 1400))
        ok, ans = await expect_submit_error(c, sign_tx(big, st), "too_large")
        check(f"payload of {len(big)} bytes (over 65536) -> too_large", ok, short(ans))
        await c.close()

        # before authentication
        c = await self.open()
        ok, ans = await expect_error(c, "head", "unauthenticated")
        check("a request before authentication -> unauthenticated, stays open", ok and c.closed is None, short(ans))
        try:
            m = await c.request("ping")
        except Exception as e:  # noqa: BLE001
            m = repr(e)
        check("ping before authentication -> pong", isinstance(m, tuple) and m[0] == "pong", short(m))
        rid = c.rid()
        await c.send("clicks", {"request_id": rid, "clicks": [[A.public, self.CNT, 1]]})
        m = await c.wait(lambda m: m[1].get("request_id") == rid or m[0] == "clicks_ack", timeout=10)
        check("clicks before authentication -> unauthenticated", m[0] == "error" and m[1].get("code") == "unauthenticated",
              short(m))
        a = await c.auth_studio(T, st)
        check("authentication still works after those", a.get("role") == "studio", short(a))
        await c.close()

        nobody = 987_654_321_987
        c = await self.open()
        ok, ans = await expect_error(c, "auth_studio", "bad_signature", tenant=T,
                                     signature=auth_signature(Keypair(), c.challenge, T))
        cl = await c.wait_close(10)
        check("auth_studio signed by another key -> bad_signature, close 1008", ok and cl and cl[0] == 1008,
              f"{short(ans)} close={cl}")
        c = await self.open()
        ok, ans = await expect_error(c, "auth_studio", "not_found", tenant=nobody,
                                     signature=auth_signature(st, c.challenge, nobody))
        cl = await c.wait_close(10)
        check("auth_studio for a tenant that does not exist -> not_found, close 1008", ok and cl and cl[0] == 1008,
              f"{short(ans)} close={cl}")
        for label, token, code in [
                ("expired session token", session_token(st, T, A.public, now_ms() - 1), "expired_token"),
                ("session token expiring in more than 7 days", session_token(st, T, A.public, now_ms() + 8 * 86_400_000),
                 "expired_token"),
                ("session token signed by another key", session_token(Keypair(), T, A.public, now_ms() + 60_000),
                 "bad_signature"),
                ("session token for a tenant that does not exist", session_token(st, nobody, A.public, now_ms() + 60_000),
                 "not_found")]:
            c = await self.open()
            ok, ans = await expect_error(c, "auth_player", code, token=token)
            cl = await c.wait_close(10)
            check(f"{label} -> {code}, close 1008", ok and cl and cl[0] == 1008, f"{short(ans)} close={cl}")

        c = await self.studio_conn()
        await c.send_raw('{"ping": {"request_id": 1}}')
        cl = await c.wait_close(10)
        errs = [m for m in c.log if m[0] == "error"]
        check("a text frame -> error {request_id: 0, code: malformed}, then close 1003",
              cl and cl[0] == 1003 and len(errs) == 1 and errs[0][1].get("code") == "malformed"
              and errs[0][1].get("request_id") == 0, f"close={cl} {short(c.log[1:])}")
        c = await self.studio_conn()
        await c.send_raw(pack({"ping": {"request_id": 5, "pad": b"x" * 262144}}))
        cl = await c.wait_close(10)
        check("a message over 262144 bytes -> close 1009", cl and cl[0] == 1009, f"close={cl}")
        c = await self.studio_conn()
        frame = None
        for k in range(262144 - 20, 262144 - 60, -1):
            f = pack({"ping": {"request_id": 6, "pad": b"x" * k}})
            if len(f) == 262144:
                frame = f
                break
        await c.send_raw(frame)
        try:
            m = await c.wait(lambda m: m[1].get("request_id") == 6, timeout=10)
        except Closed as e:
            m = ("<closed>", {"code": e.code})
        check("a message of exactly 262144 bytes is accepted", m[0] == "pong", short(m))
        await c.close()
        try:
            ws = await asyncio.wait_for(websockets.connect(self.url.rsplit("/", 1)[0] + "/v2", close_timeout=2), 10)
            await ws.close()
            status = "handshake succeeded"
        except Exception as e:  # noqa: BLE001
            status = getattr(e, "status_code", None) or getattr(getattr(e, "response", None), "status_code", repr(e))
        check("WebSocket handshake on another path -> HTTP 404", status == 404, f"status={status}")
        c = await self.studio_conn()
        for _ in range(63):
            await c.send_raw(b"\xc1")
        alive = await still_open(c)
        await c.send_raw(b"\xc1")
        cl = await c.wait_close(10)
        errs = [m for m in c.log if m[0] == "error"]
        check("64 protocol errors on one connection -> close 1008 (open after 63)",
              alive and cl and cl[0] == 1008, f"open after 63: {alive}; {len(errs)} errors, close={cl}")
        c = await self.studio_conn()
        check("the gateway still serves after all of that", await still_open(c), "")
        await c.close()

    # ------------------------------------------------------------------ end-of-run checks
    async def finish(self):
        s = self.s
        cl = await self.idle.wait_close(15)
        dt = (self.idle.closed_at - self.idle.opened_at) if self.idle.closed_at else None
        check("no authentication within 10 s -> close 1008",
              cl is not None and cl[0] == 1008 and dt is not None and 9.0 <= dt <= 13.0,
              f"close={cl} after {dt and round(dt, 1)} s, {short(self.idle.log)}")
        pushed = [m for m in s.log if m[0] in ("committed", "rejected") and m[1].get("event_id") in self.settle_ids]
        check("settle: the outcomes are not pushed to the connection that asked", self.settle_ids and not pushed,
              short(pushed))
        ids = [m[1]["event_id"] for m in s.log if m[0] == "activity" and m[1].get("subscription_id") == self.sub_all
               and m[1]["event_id"] not in self.unremembered]
        dups = {e for e in ids if ids.count(e) > 1}
        check("an event delivered more than once (resubmissions) is pushed once to a subscription",
              self.dup_ev in ids and not dups, short(dups))

    async def run(self):
        await self.connect()
        await self.setup()
        await self.players()
        for section in (self.subscribe, self.clicks, self.assets, self.exactly_once, self.trades, self.settlement,
                        self.subscriptions, self.details, self.errors, self.finish):
            try:
                await section()
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
                tb = traceback.format_exc().strip().splitlines()
                check(f"section {section.__name__} ran to its end", False,
                      f"{type(e).__name__}: {e} at {' | '.join(tb[-3:])}")

    async def close(self):
        await asyncio.gather(*[c.close() for c in self.conns], return_exceptions=True)


async def amain(args):
    suite = Suite(args.url, args.tenant, args.studio_seed)
    try:
        await asyncio.wait_for(suite.run(), OVERALL_TIMEOUT_S)
    except asyncio.TimeoutError:
        check(f"the whole run finishes within {OVERALL_TIMEOUT_S} s", False, "overall timeout")
    except Exception as e:  # noqa: BLE001
        check("setup (connect, definitions, accounts, players)", False, f"{type(e).__name__}: {e}")
    await asyncio.wait_for(suite.close(), 10)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="ws://HOST:PORT/v1")
    p.add_argument("--tenant", required=True, type=int)
    p.add_argument("--studio-seed", required=True, help="the tenant's studio key seed, 64 hex digits")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    sys.stderr = sys.stdout  # one stream: the last line is always the summary
    started = time.monotonic()
    watchdog = threading.Timer(OVERALL_TIMEOUT_S + 30, lambda: (print("FAIL watchdog: the run hung", flush=True),
                                                                 print("steps=%d failures=%d" % (len(RESULTS) + 1,
                                                                       sum(1 for _, ok in RESULTS if not ok) + 1),
                                                                       flush=True), os._exit(1)))
    watchdog.daemon = True
    watchdog.start()
    try:
        asyncio.run(amain(args))
    except Exception as e:  # noqa: BLE001
        check("the run completes", False, repr(e))
    failures = sum(1 for _, ok in RESULTS if not ok)
    print(f"# {time.monotonic() - started:.1f} s", flush=True)
    print(f"steps={len(RESULTS)} failures={failures}", flush=True)
    os._exit(0 if failures == 0 and RESULTS else 1)


if __name__ == "__main__":
    main()
