//! The registry of authenticated connections: who is connected for which tenant and player,
//! their bounded outgoing queues, and their subscriptions. Pushes never block: a full queue marks
//! the connection slow and its task closes it with 1013.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, Notify};

use hoard_types::wire::ServerMessage;
use hoard_types::{EventId, Outcome, PublicKey, TenantId, TxBody};

use crate::constants::ACTIVITY_LOG_EVENTS_PER_TENANT_MAX;
use crate::metrics as m;

/// A connection's number, unique within this gateway process.
pub type ConnId = u64;

/// How the rest of the gateway reaches one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub tenant: TenantId,
    /// The player, for player connections.
    pub player: Option<PublicKey>,
    /// Boxed: tokio allocates a channel's first block of 32 slots when it is created, so an
    /// unboxed `ServerMessage` (176 bytes) cost every idle connection 5.5 KB.
    pub outbound: mpsc::Sender<Box<ServerMessage>>,
    /// Set when the outgoing queue overflowed; `slow_notify` wakes the connection's task.
    pub slow: Arc<AtomicBool>,
    pub slow_notify: Arc<Notify>,
    /// Events this connection submitted that have not committed yet.
    pub in_flight: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
struct Subscription {
    conn: ConnId,
    id: u64,
    /// `None`: the whole tenant.
    account: Option<PublicKey>,
}

/// One committed event, as subscriptions see it.
struct Activity {
    height: u64,
    event_id: EventId,
    body: TxBody,
    outcome: Outcome,
    touched: Vec<PublicKey>,
}

/// A tenant's subscriptions and its recent activity (for `subscribe.from_height` replays).
/// Publishing and subscribing both hold the tenant's entry, so a replay and the live pushes
/// after it never overlap or leave a gap.
struct TenantActivity {
    subscriptions: Vec<Subscription>,
    log: VecDeque<Activity>,
    /// Every event at heights `>= complete_from` is still in `log`.
    complete_from: u64,
}

impl Default for TenantActivity {
    fn default() -> TenantActivity {
        TenantActivity {
            subscriptions: Vec::new(),
            log: VecDeque::new(),
            complete_from: 1,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    /// `from_height` is older than the activity the gateway keeps.
    TooOld { oldest: u64 },
}

/// Connections and subscriptions.
#[derive(Default)]
pub struct Hub {
    next_conn: AtomicU64,
    next_subscription: AtomicU64,
    conns: DashMap<ConnId, ConnHandle>,
    players: DashMap<(TenantId, PublicKey), Vec<ConnId>>,
    subscriptions: DashMap<TenantId, TenantActivity>,
    subscription_count: AtomicUsize,
}

impl Hub {
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn register(&self, conn: ConnId, handle: ConnHandle) {
        if let Some(player) = handle.player {
            self.players
                .entry((handle.tenant, player))
                .or_default()
                .push(conn);
        }
        self.conns.insert(conn, handle);
    }

    pub fn unregister(&self, conn: ConnId) {
        let Some((_, handle)) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(player) = handle.player {
            if let dashmap::mapref::entry::Entry::Occupied(mut entry) =
                self.players.entry((handle.tenant, player))
            {
                entry.get_mut().retain(|c| *c != conn);
                if entry.get().is_empty() {
                    entry.remove();
                }
            }
        }
        if let Some(mut tenant) = self.subscriptions.get_mut(&handle.tenant) {
            let subs = &mut tenant.subscriptions;
            let before = subs.len();
            subs.retain(|s| s.conn != conn);
            self.subscription_count
                .fetch_sub(before - subs.len(), Ordering::Relaxed);
        }
        metrics::gauge!(m::SUBSCRIPTIONS_OPEN).set(self.subscription_count.load(Ordering::Relaxed) as f64);
    }

    pub fn get(&self, conn: ConnId) -> Option<ConnHandle> {
        self.conns.get(&conn).map(|h| h.clone())
    }

    /// Queues `message` for `conn`; false if the connection is gone or slow.
    pub fn push(&self, conn: ConnId, message: ServerMessage) -> bool {
        let Some(handle) = self.conns.get(&conn).map(|h| h.clone()) else {
            return false;
        };
        push_to(&handle, message)
    }

    /// Queues `message` for every connection of `player`.
    pub fn push_player(&self, tenant: TenantId, player: &PublicKey, message: &ServerMessage) {
        let conns = self
            .players
            .get(&(tenant, *player))
            .map(|c| c.clone())
            .unwrap_or_default();
        for conn in conns {
            self.push(conn, message.clone());
        }
    }

    /// Adds a subscription; its id. With `from_height`, first queues every retained committed
    /// event at heights `>= from_height` that the subscription covers.
    pub fn subscribe(
        &self,
        conn: ConnId,
        tenant: TenantId,
        account: Option<PublicKey>,
        from_height: Option<u64>,
    ) -> Result<u64, SubscribeError> {
        let mut entry = self.subscriptions.entry(tenant).or_default();
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(from) = from_height {
            if from < entry.complete_from {
                return Err(SubscribeError::TooOld {
                    oldest: entry.complete_from,
                });
            }
            if let Some(handle) = self.get(conn) {
                for activity in entry.log.iter().filter(|a| a.height >= from) {
                    if covers(account.as_ref(), activity) {
                        push_to(&handle, activity_message(id, activity));
                    }
                }
            }
        }
        entry.subscriptions.push(Subscription { conn, id, account });
        let open = self.subscription_count.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(m::SUBSCRIPTIONS_OPEN).set(open as f64);
        Ok(id)
    }

    /// Removes a subscription of `conn`; false if it has none with that id.
    pub fn unsubscribe(&self, conn: ConnId, tenant: TenantId, id: u64) -> bool {
        let Some(mut entry) = self.subscriptions.get_mut(&tenant) else {
            return false;
        };
        let subs = &mut entry.subscriptions;
        let before = subs.len();
        subs.retain(|s| !(s.conn == conn && s.id == id));
        let removed = before - subs.len();
        self.subscription_count.fetch_sub(removed, Ordering::Relaxed);
        removed > 0
    }

    /// Records one committed event and pushes it to the subscriptions it concerns.
    pub fn publish(
        &self,
        tenant: TenantId,
        height: u64,
        event_id: EventId,
        body: &TxBody,
        outcome: &Outcome,
        touched: Vec<PublicKey>,
    ) {
        let mut entry = self.subscriptions.entry(tenant).or_default();
        let activity = Activity {
            height,
            event_id,
            body: body.clone(),
            outcome: outcome.clone(),
            touched,
        };
        for sub in &entry.subscriptions {
            if covers(sub.account.as_ref(), &activity) {
                self.push(sub.conn, activity_message(sub.id, &activity));
            }
        }
        entry.log.push_back(activity);
        while entry.log.len() > ACTIVITY_LOG_EVENTS_PER_TENANT_MAX {
            if let Some(dropped) = entry.log.pop_front() {
                entry.complete_from = dropped.height + 1;
            }
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

fn covers(account: Option<&PublicKey>, activity: &Activity) -> bool {
    account.is_none_or_contained(&activity.touched)
}

trait Covers {
    fn is_none_or_contained(&self, touched: &[PublicKey]) -> bool;
}

impl Covers for Option<&PublicKey> {
    fn is_none_or_contained(&self, touched: &[PublicKey]) -> bool {
        match self {
            None => true,
            Some(account) => touched.contains(account),
        }
    }
}

fn activity_message(subscription_id: u64, activity: &Activity) -> ServerMessage {
    ServerMessage::Activity {
        subscription_id,
        height: activity.height,
        event_id: activity.event_id,
        body: activity.body.clone(),
        outcome: activity.outcome.clone(),
    }
}

/// Queues a message on a connection's bounded queue; marks it slow if full.
pub fn push_to(handle: &ConnHandle, message: ServerMessage) -> bool {
    if handle.slow.load(Ordering::Relaxed) {
        return false;
    }
    match handle.outbound.try_send(Box::new(message)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            handle.slow.store(true, Ordering::Relaxed);
            handle.slow_notify.notify_one();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
