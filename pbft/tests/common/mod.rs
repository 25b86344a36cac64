//! A hand-driven cluster for scenario tests: a FIFO network with a drop filter, timers that
//! fire when the test's clock passes them, and disks (durable state + block log).

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use hoard_pbft::{
    App, Committed, Config, DurableState, Message, Output, Record, Replica, ReplicaId, Request,
    SignedMessage, TestApp, Timer,
};
use hoard_types::crypto::{Hash, Keypair, PublicKey};

/// A reply a replica emitted: (client, seq, request digest, reply).
pub type Reply = (u64, u64, Hash, Vec<u8>);

#[derive(Clone, Default)]
pub struct Disk {
    pub durable: DurableState,
    pub blocks: Vec<Committed>,
}

pub type DropFilter = Box<dyn FnMut(ReplicaId, ReplicaId, &Message) -> bool>;
pub type Rewrite = Box<dyn FnMut(ReplicaId, ReplicaId, SignedMessage) -> SignedMessage>;

pub struct Cluster {
    pub n: usize,
    pub keypairs: Vec<Keypair>,
    pub keys: Vec<PublicKey>,
    pub nodes: Vec<Option<Replica<TestApp>>>,
    pub disks: Vec<Disk>,
    pub queue: VecDeque<(ReplicaId, ReplicaId, SignedMessage)>,
    /// Armed timers: (node, timer) -> due time.
    pub timers: BTreeMap<(ReplicaId, Timer), u64>,
    pub now: u64,
    pub executed: Vec<Vec<Committed>>,
    /// Replies each replica emitted.
    pub replies: Vec<Vec<Reply>>,
    pub transferred: Vec<Vec<u64>>,
    /// Return true to drop a message from -> to.
    pub drop: DropFilter,
    /// Rewrites what a replica sends (a Byzantine sender).
    pub rewrite: Option<(ReplicaId, Rewrite)>,
    pub checkpoint_interval: u64,
    pub window: u64,
    /// Applied to every replica's configuration (also on restarts).
    pub tweak: fn(&mut Config),
}

impl Cluster {
    pub fn new(n: usize) -> Cluster {
        Cluster::with_window(n, 4, 8)
    }

    pub fn with_window(n: usize, checkpoint_interval: u64, window: u64) -> Cluster {
        Cluster::with_config(n, checkpoint_interval, window, |_| {})
    }

    /// A cluster whose replicas' configurations are changed by `tweak`.
    pub fn with_config(n: usize, checkpoint_interval: u64, window: u64, tweak: fn(&mut Config)) -> Cluster {
        let keypairs: Vec<Keypair> = (0..n).map(|i| Keypair::from_seed([i as u8 + 1; 32])).collect();
        let keys: Vec<PublicKey> = keypairs.iter().map(Keypair::public).collect();
        let mut cluster = Cluster {
            n,
            keypairs,
            keys,
            nodes: Vec::new(),
            disks: vec![Disk::default(); n],
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            now: 1,
            executed: vec![Vec::new(); n],
            replies: vec![Vec::new(); n],
            transferred: vec![Vec::new(); n],
            drop: Box::new(|_, _, _| false),
            rewrite: None,
            checkpoint_interval,
            window,
            tweak,
        };
        for id in 0..n as ReplicaId {
            let replica = Replica::new(cluster.config(id), TestApp::new()).unwrap();
            cluster.nodes.push(Some(replica));
        }
        for id in 0..n as ReplicaId {
            let outputs = cluster.nodes[id as usize].as_mut().unwrap().start();
            cluster.apply(id, outputs);
        }
        cluster
    }

    pub fn config(&self, id: ReplicaId) -> Config {
        let mut config = Config::new(id, self.keys.clone(), self.keypairs[id as usize].clone());
        config.checkpoint_interval = self.checkpoint_interval;
        config.window = self.window;
        config.batch_size_max = 4;
        config.batch_timeout_ms = 5;
        config.view_change_timeout_ms = 200;
        config.view_change_timeout_max_ms = 1_600;
        config.status_interval_ms = 50;
        config.state_transfer_timeout_ms = 200;
        (self.tweak)(&mut config);
        config
    }

    pub fn replica(&self, id: ReplicaId) -> &Replica<TestApp> {
        self.nodes[id as usize].as_ref().expect("replica is up")
    }

    pub fn apply(&mut self, id: ReplicaId, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, msg } => self.send(id, to, msg),
                Output::Broadcast { msg } => {
                    for to in 0..self.n as ReplicaId {
                        if to != id {
                            self.send(id, to, msg.clone());
                        }
                    }
                }
                Output::SetTimer { timer, after_ms } => {
                    self.timers.insert((id, timer), self.now + after_ms);
                }
                Output::CancelTimer { timer } => {
                    self.timers.remove(&(id, timer));
                }
                Output::Persist(record) => {
                    let disk = &mut self.disks[id as usize];
                    if let Record::StableCheckpoint { cert, .. } = &record {
                        let seq = cert.seq;
                        disk.blocks.retain(|b| b.seq > seq);
                    }
                    disk.durable.apply(record);
                }
                Output::Committed(committed) => {
                    self.disks[id as usize].blocks.push(committed.clone());
                    self.executed[id as usize].push(committed);
                }
                Output::StateTransferred { seq, .. } => {
                    self.disks[id as usize].blocks.clear();
                    self.transferred[id as usize].push(seq);
                }
                Output::Reply {
                    client,
                    seq,
                    request_digest,
                    reply,
                } => self.replies[id as usize].push((client, seq, request_digest, reply)),
                Output::StableCheckpoint { .. } => {}
            }
        }
    }

    fn send(&mut self, from: ReplicaId, to: ReplicaId, msg: SignedMessage) {
        let msg = match &mut self.rewrite {
            Some((byzantine, rewrite)) if *byzantine == from => rewrite(from, to, msg),
            _ => msg,
        };
        self.queue.push_back((from, to, msg));
    }

    /// Delivers queued messages until none are left (or a cap is hit).
    pub fn deliver_all(&mut self) {
        let mut budget = 200_000;
        while let Some((from, to, msg)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "message storm");
            let message = msg.message(usize::MAX).unwrap();
            if (self.drop)(from, to, &message) {
                continue;
            }
            let now = self.now;
            let Some(replica) = self.nodes[to as usize].as_mut() else {
                continue;
            };
            replica.set_now(now);
            let outputs = replica.on_message(from, msg);
            self.apply(to, outputs);
        }
    }

    /// Advances the clock by `ms` in 5 ms steps, delivering messages and firing due timers.
    pub fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.deliver_all();
            self.now += 5;
            let due: Vec<(ReplicaId, Timer)> = self
                .timers
                .iter()
                .filter(|(_, at)| **at <= self.now)
                .map(|(k, _)| *k)
                .collect();
            for (id, timer) in due {
                self.timers.remove(&(id, timer));
                let now = self.now;
                if let Some(replica) = self.nodes[id as usize].as_mut() {
                    replica.set_now(now);
                    let outputs = replica.on_timer(timer);
                    self.apply(id, outputs);
                }
            }
        }
        self.deliver_all();
    }

    pub fn request(&mut self, to: ReplicaId, client: u64, nonce: u64) -> Request {
        let mut payload = vec![(nonce % 200) as u8];
        payload.extend_from_slice(&nonce.to_le_bytes());
        let request = Request { client, payload };
        self.submit(to, request.clone());
        request
    }

    pub fn submit(&mut self, to: ReplicaId, request: Request) {
        let now = self.now;
        if let Some(replica) = self.nodes[to as usize].as_mut() {
            replica.set_now(now);
            let outputs = replica.on_request(request);
            self.apply(to, outputs);
        }
    }

    pub fn submit_all(&mut self, request: Request) {
        for id in 0..self.n as ReplicaId {
            self.submit(id, request.clone());
        }
    }

    pub fn crash(&mut self, id: ReplicaId) {
        self.nodes[id as usize] = None;
        self.timers.retain(|(node, _), _| *node != id);
        self.queue.retain(|(from, to, _)| *from != id && *to != id);
    }

    /// Restarts from `disk`: restore the durable snapshot, replay the block log, recover.
    pub fn restart_from(&mut self, id: ReplicaId, disk: Disk) {
        let mut app = TestApp::new();
        if let Some(snapshot) = &disk.durable.stable_snapshot {
            app.restore(snapshot.bytes()).unwrap();
        }
        for block in &disk.blocks {
            if block.seq == app.last_executed() + 1 {
                let executed = app.execute(block.seq, block.timestamp_ms, &block.batch.requests);
                assert_eq!(executed.digest, block.digest, "replay reproduces the digest");
            }
        }
        self.disks[id as usize] = disk.clone();
        let mut replica = Replica::recover(self.config(id), app, disk.durable).unwrap();
        replica.set_now(self.now);
        let outputs = replica.start();
        self.nodes[id as usize] = Some(replica);
        self.apply(id, outputs);
    }

    pub fn restart(&mut self, id: ReplicaId) {
        let disk = self.disks[id as usize].clone();
        self.restart_from(id, disk);
    }

    /// No two replicas executed different batches or digests at one seq.
    pub fn assert_agreement(&self) {
        let mut by_seq: BTreeMap<u64, (hoard_types::crypto::Hash, [u8; 32])> = BTreeMap::new();
        for (id, executed) in self.executed.iter().enumerate() {
            for committed in executed {
                let entry = by_seq
                    .entry(committed.seq)
                    .or_insert((committed.batch_digest, committed.digest));
                assert_eq!(
                    *entry,
                    (committed.batch_digest, committed.digest),
                    "replica {id} disagrees at seq {}",
                    committed.seq
                );
            }
        }
    }

    /// Whether `request` was executed by replica `id`.
    pub fn executed_request(&self, id: ReplicaId, request: &Request) -> bool {
        self.executed[id as usize]
            .iter()
            .any(|c| c.batch.requests.contains(request))
    }

    pub fn last_executed(&self, id: ReplicaId) -> u64 {
        self.replica(id).last_executed()
    }

    /// All live replicas at the same seq and app digest.
    pub fn converged(&self) -> bool {
        let states: Vec<(u64, [u8; 32])> = self
            .nodes
            .iter()
            .flatten()
            .map(|r| (r.last_executed(), r.app().digest()))
            .collect();
        states.windows(2).all(|w| w[0] == w[1])
    }
}
