//! The deterministic simulator: one `u64` seed drives a simulated network (loss, delay,
//! duplication, reordering, partitions that heal), simulated disks (Persist records and a
//! block log; a crash loses memory, a restart recovers from disk, an "old disk" restart
//! recovers from an earlier copy), a simulated clock, a client workload and Byzantine
//! replicas (equivocating primary, garbage, bad signatures, replayed stale messages), all
//! generic over the [`App`].
//!
//! A run has a fault phase (safety is checked after every event: no two honest replicas
//! execute different batches or digests at one seq, every executed request was submitted, the
//! app's invariant holds, memory stays bounded) and a liveness phase (faults heal; every
//! honest replica must reach the same seq and digest, and every submitted request must
//! execute and be answered at its client by f+1 matching replies, within bounded simulated
//! time). A client retransmits to every replica until it has its answer, as `ChainClient` does;
//! replies are lost like messages while faults are active. Fault rates are drawn per seed and
//! printed with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use hoard_types::crypto::{Hash, Keypair, PublicKey};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::app::App;
use crate::message::{Message, ReplicaId, Request, SignedMessage};
use crate::replica::Replica;
use crate::types::{Config, DurableState, Output, Record, Timer};

/// The simulator's random number generator (what `make_request` receives).
pub use rand_chacha::ChaCha8Rng as SimRng;

/// The app's invariant, checked after every event on every honest replica.
pub type Invariant<A> = Arc<dyn Fn(&A) -> Result<(), String> + Send + Sync>;

/// Knobs of a simulated run.
#[derive(Clone)]
pub struct SimOptions<A> {
    /// Simulated length of the fault phase.
    pub fault_phase_ms: u64,
    /// Simulated time allowed to converge after faults heal.
    pub liveness_ms: u64,
    /// Number of clients submitting requests.
    pub clients: u64,
    /// Mean time between two requests of one client.
    pub request_interval_ms: u64,
    /// Whether to inject network faults, crashes and old disks.
    pub faults: bool,
    /// Whether up to f replicas may be Byzantine.
    pub byzantine: bool,
    /// Print one line per notable event.
    pub verbose: bool,
    /// The app's invariant.
    pub invariant: Option<Invariant<A>>,
    /// How a failing seed is replayed; `{seed}` and `{replicas}` are substituted.
    pub replay_command: String,
    /// Replica settings (ids, keys filled in per replica).
    pub checkpoint_interval: u64,
    pub window: u64,
    pub batch_size_max: usize,
    pub view_change_timeout_ms: u64,
    pub status_interval_ms: u64,
    /// Stop a run after this many events (a livelock guard).
    pub events_max: u64,
}

impl<A> Default for SimOptions<A> {
    fn default() -> Self {
        SimOptions {
            fault_phase_ms: 1_000,
            liveness_ms: 30_000,
            clients: 3,
            request_interval_ms: 40,
            faults: true,
            byzantine: true,
            verbose: false,
            invariant: None,
            replay_command: "cargo run -p hoard-pbft --bin pbft-sim -- --seed {seed} --replicas {replicas}"
                .into(),
            checkpoint_interval: 8,
            window: 16,
            batch_size_max: 8,
            view_change_timeout_ms: 300,
            status_interval_ms: 80,
            events_max: 2_000_000,
        }
    }
}

/// Fault rates drawn from the seed.
#[derive(Clone, Debug, Default)]
pub struct FaultParams {
    pub loss: f64,
    pub duplicate: f64,
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    pub crash_per_s: f64,
    pub partition_per_s: f64,
    pub byzantine: Vec<ReplicaId>,
    pub equivocate: bool,
    pub garbage: f64,
    pub bad_signature: f64,
    pub replay: f64,
    pub slow: Option<ReplicaId>,
    pub old_disk: Option<ReplicaId>,
    pub crash_all_at_ms: Option<u64>,
}

impl fmt::Display for FaultParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loss={:.3} dup={:.3} delay={}..{}ms crash/s={:.2} partition/s={:.2} byz={:?} equivocate={} \
             garbage={:.2} badsig={:.2} replay={:.2} slow={:?} old_disk={:?} crash_all_at={:?}",
            self.loss,
            self.duplicate,
            self.delay_min_ms,
            self.delay_max_ms,
            self.crash_per_s,
            self.partition_per_s,
            self.byzantine,
            self.equivocate,
            self.garbage,
            self.bad_signature,
            self.replay,
            self.slow,
            self.old_disk,
            self.crash_all_at_ms
        )
    }
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Two honest replicas executed different batches or reached different digests at one seq.
    Safety,
    /// A request was executed that no client submitted.
    Forged,
    /// The app's invariant failed.
    Invariant,
    /// A replica's memory exceeded its bounds.
    Memory,
    /// The replicas did not converge after faults healed.
    Liveness,
    /// A replica could not be recovered from its disk.
    Recovery,
}

/// The outcome of one seed.
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub seed: u64,
    pub replicas: usize,
    pub params: FaultParams,
    pub failure: Option<(FailureKind, String)>,
    pub executed_seq: u64,
    pub requests_submitted: u64,
    pub requests_executed: u64,
    /// Requests whose client got f+1 matching replies.
    pub requests_answered: u64,
    pub view_changes: u64,
    pub state_transfers: u64,
    pub crashes: u64,
    pub messages_delivered: u64,
    pub simulated_ms: u64,
    pub events: u64,
}

impl SeedReport {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// The one-seed summary the simulator commands print.
impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} {} executed_seq={} requests={}/{} answered={} view_changes={} state_transfers={} \
             crashes={} messages={} simulated_ms={} events={}\n  params: {}",
            self.seed,
            if self.ok() { "ok" } else { "FAILED" },
            self.executed_seq,
            self.requests_executed,
            self.requests_submitted,
            self.requests_answered,
            self.view_changes,
            self.state_transfers,
            self.crashes,
            self.messages_delivered,
            self.simulated_ms,
            self.events,
            self.params
        )
    }
}

#[derive(Clone, Debug, Default)]
struct Disk {
    durable: DurableState,
    /// Executed batches after the durable snapshot: (seq, timestamp, requests, digest).
    blocks: Vec<(u64, u64, Vec<Request>, [u8; 32])>,
}

struct Node<A: App> {
    replica: Option<Replica<A>>,
    disk: Disk,
    saved_disk: Option<Disk>,
    timers: [u64; 4],
    byzantine: bool,
    sent: Vec<Arc<Vec<u8>>>,
    /// A Byzantine primary's second batch digest per (view, seq).
    alternatives: BTreeMap<(u64, u64), Hash>,
}

enum Event {
    Deliver {
        to: ReplicaId,
        from: ReplicaId,
        bytes: Arc<Vec<u8>>,
    },
    Timer {
        node: ReplicaId,
        timer: Timer,
        generation: u64,
    },
    Submit {
        client: u64,
    },
    Retransmit {
        request: usize,
    },
    Crash {
        node: ReplicaId,
        old_disk: bool,
    },
    Restart {
        node: ReplicaId,
    },
    CrashAll,
    Partition,
    Heal,
    SaveDisk {
        node: ReplicaId,
    },
}

fn timer_index(timer: Timer) -> usize {
    match timer {
        Timer::Batch => 0,
        Timer::ViewChange => 1,
        Timer::Status => 2,
        Timer::StateTransfer => 3,
    }
}

struct Sim<'a, A: App, MA, MR> {
    rng: ChaCha8Rng,
    now: u64,
    order: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<Node<A>>,
    keypairs: Vec<Keypair>,
    keys: Vec<PublicKey>,
    params: FaultParams,
    options: &'a SimOptions<A>,
    make_app: MA,
    make_request: MR,
    check_app: A,
    faults_active: bool,
    partition: Option<Vec<bool>>,
    /// seq -> (batch digest, app digest, first replica to execute it)
    history: BTreeMap<u64, (Hash, [u8; 32], ReplicaId)>,
    requests: Vec<SimRequest>,
    request_index: BTreeMap<Hash, usize>,
    must_execute: BTreeSet<usize>,
    /// Requests the app accepts whose client has not yet got f+1 matching replies.
    must_answer: BTreeSet<usize>,
    nonce: u64,
    failure: Option<(FailureKind, String)>,
    report: SeedReport,
}

/// A submitted request, as its client sees it.
struct SimRequest {
    request: Request,
    /// Some honest replica executed it.
    executed: bool,
    /// Its client got f+1 matching replies (and stopped retransmitting).
    answered: bool,
    /// Replies so far, by replica: (seq, reply).
    replies: BTreeMap<ReplicaId, (u64, Vec<u8>)>,
}

/// Runs one seed. `make_app(id)` builds a fresh app (at genesis) for replica `id`;
/// `make_request(rng, client, nonce)` builds a client request.
pub fn run_seed<A, MA, MR>(
    seed: u64,
    replicas: usize,
    make_app: MA,
    make_request: MR,
    options: &SimOptions<A>,
) -> SeedReport
where
    A: App,
    MA: FnMut(ReplicaId) -> A,
    MR: FnMut(&mut ChaCha8Rng, u64, u64) -> Request,
{
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let f = (replicas.max(1) - 1) / 3;
    let params = draw_params(&mut rng, replicas, f, options);
    let keypairs: Vec<Keypair> = (0..replicas)
        .map(|i| {
            let mut seed_bytes = [0u8; 32];
            seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
            seed_bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            Keypair::from_seed(seed_bytes)
        })
        .collect();
    let keys: Vec<PublicKey> = keypairs.iter().map(Keypair::public).collect();
    let mut make_app = make_app;
    let check_app = make_app(0);
    let report = SeedReport {
        seed,
        replicas,
        params: params.clone(),
        failure: None,
        executed_seq: 0,
        requests_submitted: 0,
        requests_executed: 0,
        requests_answered: 0,
        view_changes: 0,
        state_transfers: 0,
        crashes: 0,
        messages_delivered: 0,
        simulated_ms: 0,
        events: 0,
    };
    let mut sim = Sim {
        rng,
        now: 0,
        order: 0,
        queue: BTreeMap::new(),
        nodes: Vec::new(),
        keypairs,
        keys,
        params,
        options,
        make_app,
        make_request,
        check_app,
        faults_active: options.faults,
        partition: None,
        history: BTreeMap::new(),
        requests: Vec::new(),
        request_index: BTreeMap::new(),
        must_execute: BTreeSet::new(),
        must_answer: BTreeSet::new(),
        nonce: 0,
        failure: None,
        report,
    };
    sim.run();
    sim.report.failure = sim.failure.take();
    sim.report.simulated_ms = sim.now;
    sim.report
}

fn draw_params<A>(rng: &mut ChaCha8Rng, n: usize, f: usize, options: &SimOptions<A>) -> FaultParams {
    let mut params = FaultParams {
        delay_min_ms: 1,
        delay_max_ms: 5,
        ..FaultParams::default()
    };
    if !options.faults {
        return params;
    }
    params.loss = if rng.gen_bool(0.3) {
        0.0
    } else {
        rng.gen_range(0.0..0.15)
    };
    params.duplicate = rng.gen_range(0.0..0.05);
    params.delay_min_ms = rng.gen_range(1..5);
    params.delay_max_ms = params.delay_min_ms + rng.gen_range(0..40);
    params.crash_per_s = if rng.gen_bool(0.3) {
        0.0
    } else {
        rng.gen_range(0.0..1.5)
    };
    params.partition_per_s = if rng.gen_bool(0.5) {
        0.0
    } else {
        rng.gen_range(0.0..1.0)
    };
    let mut budget = f;
    if options.byzantine && rng.gen_bool(0.6) {
        let count = rng.gen_range(1..=f);
        let mut ids: Vec<ReplicaId> = (0..n as ReplicaId).collect();
        for i in 0..count {
            let j = rng.gen_range(i..ids.len());
            ids.swap(i, j);
        }
        params.byzantine = ids[..count].to_vec();
        params.byzantine.sort_unstable();
        budget -= count;
        params.equivocate = rng.gen_bool(0.7);
        params.garbage = rng.gen_range(0.0..0.2);
        params.bad_signature = rng.gen_range(0.0..0.2);
        params.replay = rng.gen_range(0.0..0.2);
    }
    if rng.gen_bool(0.3) {
        params.slow = Some(rng.gen_range(0..n as ReplicaId));
    }
    if budget > 0 && rng.gen_bool(0.3) {
        let candidates: Vec<ReplicaId> = (0..n as ReplicaId)
            .filter(|id| !params.byzantine.contains(id))
            .collect();
        params.old_disk = Some(candidates[rng.gen_range(0..candidates.len())]);
    }
    if rng.gen_bool(0.2) {
        params.crash_all_at_ms =
            Some(rng.gen_range(options.fault_phase_ms / 4..options.fault_phase_ms * 3 / 4));
    }
    params
}

impl<A, MA, MR> Sim<'_, A, MA, MR>
where
    A: App,
    MA: FnMut(ReplicaId) -> A,
    MR: FnMut(&mut ChaCha8Rng, u64, u64) -> Request,
{
    fn n(&self) -> usize {
        self.keys.len()
    }

    fn config(&self, id: ReplicaId) -> Config {
        let mut config = Config::new(id, self.keys.clone(), self.keypairs[id as usize].clone());
        config.checkpoint_interval = self.options.checkpoint_interval;
        config.window = self.options.window;
        config.batch_size_max = self.options.batch_size_max;
        config.batch_bytes_max = 64 * 1024;
        config.request_bytes_max = 4 * 1024;
        config.pending_requests_max = 512;
        config.message_bytes_max = 4 * 1024 * 1024;
        config.batch_timeout_ms = 10;
        config.view_change_timeout_ms = self.options.view_change_timeout_ms;
        config.view_change_timeout_max_ms = self.options.view_change_timeout_ms * 8;
        config.status_interval_ms = self.options.status_interval_ms;
        config.state_transfer_timeout_ms = self.options.status_interval_ms * 4;
        config
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.order += 1;
        self.queue.insert((at, self.order), event);
    }

    fn log(&self, text: impl FnOnce() -> String) {
        if self.options.verbose {
            println!("[{:>6}ms] {}", self.now, text());
        }
    }

    fn fail(&mut self, kind: FailureKind, detail: String) {
        if self.failure.is_none() {
            self.log(|| format!("FAILURE {kind:?}: {detail}"));
            self.failure = Some((kind, detail));
        }
    }

    fn run(&mut self) {
        let n = self.n();
        for id in 0..n as ReplicaId {
            let app = (self.make_app)(id);
            let replica = match Replica::new(self.config(id), app) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(FailureKind::Recovery, format!("replica {id}: {e}"));
                    return;
                }
            };
            let byzantine = self.params.byzantine.contains(&id);
            self.nodes.push(Node {
                replica: Some(replica),
                disk: Disk::default(),
                saved_disk: None,
                timers: [0; 4],
                byzantine,
                sent: Vec::new(),
                alternatives: BTreeMap::new(),
            });
        }
        for id in 0..n as ReplicaId {
            let outputs = self.nodes[id as usize]
                .replica
                .as_mut()
                .map(|r| r.start())
                .unwrap_or_default();
            self.process_outputs(id, outputs);
        }
        for client in 0..self.options.clients {
            let at = self.rng.gen_range(0..self.options.request_interval_ms.max(1));
            self.schedule(at, Event::Submit { client });
        }
        if self.options.faults {
            let fault_ms = self.options.fault_phase_ms;
            self.schedule_poisson_crashes(fault_ms);
            if let Some(at) = self.params.crash_all_at_ms {
                self.schedule(at, Event::CrashAll);
            }
            if self.params.partition_per_s > 0.0 {
                let at = self.exp_ms(self.params.partition_per_s);
                self.schedule(at, Event::Partition);
            }
            if let Some(node) = self.params.old_disk {
                let save_at = self.rng.gen_range(fault_ms / 8..fault_ms / 3);
                let crash_at = self.rng.gen_range(fault_ms / 2..fault_ms);
                self.schedule(save_at, Event::SaveDisk { node });
                self.schedule(crash_at, Event::Crash { node, old_disk: true });
            }
        }
        let fault_end = self.options.fault_phase_ms;
        let deadline = fault_end + self.options.liveness_ms;
        let mut healed = false;
        let mut next_liveness_check = fault_end;
        while let Some(((at, _), event)) = self.queue.pop_first() {
            if at >= fault_end && !healed {
                healed = true;
                self.now = fault_end;
                self.heal();
            }
            self.now = at;
            if self.now > deadline {
                break;
            }
            self.report.events += 1;
            if self.report.events > self.options.events_max {
                self.fail(
                    FailureKind::Liveness,
                    format!("event budget {} exhausted", self.options.events_max),
                );
                break;
            }
            self.handle(event);
            if self.failure.is_some() {
                break;
            }
            if healed && self.now >= next_liveness_check {
                next_liveness_check = self.now + 20;
                if self.converged() {
                    break;
                }
            }
        }
        if self.failure.is_none() && !self.converged() {
            let state: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| match &node.replica {
                    Some(r) => format!(
                        "r{i}{}:exec={} view={}{} low={}",
                        if node.byzantine { "(byz)" } else { "" },
                        r.last_executed(),
                        r.view(),
                        if r.in_view_change() { "vc" } else { "" },
                        r.stable_checkpoint()
                    ),
                    None => format!("r{i}:down"),
                })
                .collect();
            let missing = self.must_execute.len();
            let unanswered = self.must_answer.len();
            if self.options.verbose {
                for (i, node) in self.nodes.iter().enumerate() {
                    if let Some(r) = &node.replica {
                        eprintln!("r{i} slots:\n{}", r.describe_slots());
                    }
                }
            }
            self.fail(
                FailureKind::Liveness,
                format!(
                    "not converged {}ms after healing: {} ({missing} requests not executed, \
                     {unanswered} not answered at their clients)",
                    self.options.liveness_ms,
                    state.join(" ")
                ),
            );
        }
        for node in &self.nodes {
            if let Some(r) = &node.replica {
                if !node.byzantine {
                    self.report.executed_seq = self.report.executed_seq.max(r.last_executed());
                }
                self.report.view_changes += r.stats().view_changes_total;
                self.report.state_transfers += r.stats().state_transfers_completed_total;
            }
        }
        self.report.requests_submitted = self.requests.len() as u64;
        self.report.requests_executed = self.requests.iter().filter(|r| r.executed).count() as u64;
        self.report.requests_answered = self.requests.iter().filter(|r| r.answered).count() as u64;
    }

    fn exp_ms(&mut self, rate_per_s: f64) -> u64 {
        let u: f64 = self.rng.gen_range(1e-9..1.0);
        (-u.ln() / rate_per_s * 1000.0) as u64 + 1
    }

    fn schedule_poisson_crashes(&mut self, until: u64) {
        if self.params.crash_per_s <= 0.0 {
            return;
        }
        let mut at = 0;
        loop {
            at += self.exp_ms(self.params.crash_per_s);
            if at >= until {
                return;
            }
            let node = self.rng.gen_range(0..self.n() as ReplicaId);
            self.schedule(
                at,
                Event::Crash {
                    node,
                    old_disk: false,
                },
            );
        }
    }

    fn heal(&mut self) {
        self.log(|| "faults heal".into());
        self.faults_active = false;
        self.partition = None;
        for id in 0..self.n() as ReplicaId {
            if self.nodes[id as usize].replica.is_none() {
                self.restart(id);
            }
        }
        // Outstanding requests are retransmitted by their clients.
    }

    /// Every honest replica at the same seq and digest, and every accepted request executed and
    /// answered at its client.
    fn converged(&self) -> bool {
        if !self.must_execute.is_empty() || !self.must_answer.is_empty() {
            return false;
        }
        let mut seen: Option<(u64, [u8; 32])> = None;
        for node in &self.nodes {
            if node.byzantine {
                continue;
            }
            let Some(replica) = &node.replica else {
                return false;
            };
            let state = (replica.last_executed(), replica.app().digest());
            match seen {
                None => seen = Some(state),
                Some(s) if s != state => return false,
                Some(_) => {}
            }
        }
        true
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, from, bytes } => {
                self.report.messages_delivered += 1;
                let now = self.now;
                let Some(replica) = self.nodes[to as usize].replica.as_mut() else {
                    return;
                };
                replica.set_now(now);
                let outputs = replica.on_bytes(from, &bytes);
                self.process_outputs(to, outputs);
                self.after_step(to);
            }
            Event::Timer {
                node,
                timer,
                generation,
            } => {
                if self.nodes[node as usize].timers[timer_index(timer)] != generation {
                    return;
                }
                let now = self.now;
                let Some(replica) = self.nodes[node as usize].replica.as_mut() else {
                    return;
                };
                replica.set_now(now);
                let outputs = replica.on_timer(timer);
                self.process_outputs(node, outputs);
                self.after_step(node);
            }
            Event::Submit { client } => {
                if (self.faults_active || !self.options.faults) && self.now < self.options.fault_phase_ms {
                    self.submit(client);
                    let gap = self
                        .rng
                        .gen_range(1..=2 * self.options.request_interval_ms.max(1));
                    self.schedule(self.now + gap, Event::Submit { client });
                }
            }
            Event::Retransmit { request } => {
                if self.requests[request].answered {
                    return;
                }
                let req = self.requests[request].request.clone();
                for id in 0..self.n() as ReplicaId {
                    self.deliver_request(id, req.clone());
                }
                let again = self.now + self.options.view_change_timeout_ms.max(100);
                self.schedule(again, Event::Retransmit { request });
            }
            Event::Crash { node, old_disk } => {
                if !self.faults_active || self.nodes[node as usize].replica.is_none() {
                    return;
                }
                self.crash(node, old_disk);
                let down = self.rng.gen_range(10..400);
                self.schedule(self.now + down, Event::Restart { node });
            }
            Event::CrashAll => {
                if !self.faults_active {
                    return;
                }
                for node in 0..self.n() as ReplicaId {
                    if self.nodes[node as usize].replica.is_some() {
                        self.crash(node, false);
                    }
                    let down = self.rng.gen_range(10..200);
                    self.schedule(self.now + down, Event::Restart { node });
                }
            }
            Event::Restart { node } => {
                if self.nodes[node as usize].replica.is_none() {
                    self.restart(node);
                }
            }
            Event::Partition => {
                if !self.faults_active {
                    return;
                }
                let n = self.n();
                let side: Vec<bool> = (0..n).map(|_| self.rng.gen_bool(0.5)).collect();
                self.log(|| format!("partition {side:?}"));
                self.partition = Some(side);
                let heal = self.rng.gen_range(50..500);
                self.schedule(self.now + heal, Event::Heal);
                let next = self.exp_ms(self.params.partition_per_s);
                self.schedule(self.now + heal + next, Event::Partition);
            }
            Event::Heal => {
                self.partition = None;
            }
            Event::SaveDisk { node } => {
                self.nodes[node as usize].saved_disk = Some(self.nodes[node as usize].disk.clone());
            }
        }
    }

    fn crash(&mut self, node: ReplicaId, old_disk: bool) {
        self.report.crashes += 1;
        let entry = &mut self.nodes[node as usize];
        entry.replica = None;
        for generation in entry.timers.iter_mut() {
            *generation += 1;
        }
        if old_disk {
            if let Some(saved) = entry.saved_disk.take() {
                entry.disk = saved;
            }
        }
        self.log(|| format!("crash r{node} old_disk={old_disk}"));
    }

    fn restart(&mut self, node: ReplicaId) {
        let disk = self.nodes[node as usize].disk.clone();
        let mut app = (self.make_app)(node);
        if let Some(snapshot) = &disk.durable.stable_snapshot {
            if let Err(e) = app.restore(snapshot.bytes()) {
                self.fail(FailureKind::Recovery, format!("r{node}: snapshot restore: {e}"));
                return;
            }
        }
        for (seq, timestamp, requests, digest) in &disk.blocks {
            if *seq == app.last_executed() + 1 {
                let executed = app.execute(*seq, *timestamp, requests);
                if executed.digest != *digest {
                    self.fail(
                        FailureKind::Recovery,
                        format!("r{node}: replay of seq {seq} diverged"),
                    );
                    return;
                }
            }
        }
        let replica = match Replica::recover(self.config(node), app, disk.durable.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.fail(FailureKind::Recovery, format!("r{node}: recover: {e}"));
                return;
            }
        };
        self.log(|| {
            format!(
                "restart r{node} at exec={} view={}",
                replica.last_executed(),
                replica.view()
            )
        });
        self.nodes[node as usize].replica = Some(replica);
        let now = self.now;
        let outputs = {
            let replica = self.nodes[node as usize].replica.as_mut().expect("just set");
            replica.set_now(now);
            replica.start()
        };
        self.process_outputs(node, outputs);
    }

    fn submit(&mut self, client: u64) {
        self.nonce += 1;
        let request = (self.make_request)(&mut self.rng, client, self.nonce);
        let digest = request.digest();
        if self.request_index.contains_key(&digest) {
            return;
        }
        let index = self.requests.len();
        self.requests.push(SimRequest {
            request: request.clone(),
            executed: false,
            answered: false,
            replies: BTreeMap::new(),
        });
        self.request_index.insert(digest, index);
        self.report.requests_submitted += 1;
        if self.check_app.check_requests(std::slice::from_ref(&request)) == [true] {
            self.must_execute.insert(index);
            self.must_answer.insert(index);
        }
        // First to one replica (the one the client believes is the primary); later to all.
        let target = self.rng.gen_range(0..self.n() as ReplicaId);
        self.deliver_request(target, request);
        let retransmit = self.now + self.options.view_change_timeout_ms.max(100) / 2;
        self.schedule(retransmit, Event::Retransmit { request: index });
    }

    fn deliver_request(&mut self, to: ReplicaId, request: Request) {
        let now = self.now;
        let Some(replica) = self.nodes[to as usize].replica.as_mut() else {
            return;
        };
        replica.set_now(now);
        let outputs = replica.on_request(request);
        self.process_outputs(to, outputs);
        self.after_step(to);
    }

    fn after_step(&mut self, id: ReplicaId) {
        let node = &self.nodes[id as usize];
        if node.byzantine {
            return;
        }
        let Some(replica) = &node.replica else { return };
        if !replica.memory_bounded() {
            let stats = replica.stats().clone();
            self.fail(
                FailureKind::Memory,
                format!("r{id}: memory bounds exceeded: {stats:?}"),
            );
            return;
        }
        if let Some(invariant) = &self.options.invariant {
            if let Err(e) = invariant(replica.app()) {
                self.fail(FailureKind::Invariant, format!("r{id}: {e}"));
            }
        }
    }

    fn process_outputs(&mut self, id: ReplicaId, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, msg } => self.transmit(id, Some(to), msg),
                Output::Broadcast { msg } => self.transmit(id, None, msg),
                Output::SetTimer { timer, after_ms } => {
                    let node = &mut self.nodes[id as usize];
                    node.timers[timer_index(timer)] += 1;
                    let generation = node.timers[timer_index(timer)];
                    self.schedule(
                        self.now + after_ms,
                        Event::Timer {
                            node: id,
                            timer,
                            generation,
                        },
                    );
                }
                Output::CancelTimer { timer } => {
                    self.nodes[id as usize].timers[timer_index(timer)] += 1;
                }
                Output::Persist(record) => {
                    let disk = &mut self.nodes[id as usize].disk;
                    if let Record::StableCheckpoint { cert, .. } = &record {
                        let seq = cert.seq;
                        disk.blocks.retain(|(s, ..)| *s > seq);
                    }
                    disk.durable.apply(record);
                }
                Output::Committed(committed) => {
                    let byzantine = self.nodes[id as usize].byzantine;
                    self.nodes[id as usize].disk.blocks.push((
                        committed.seq,
                        committed.timestamp_ms,
                        committed.batch.requests.clone(),
                        committed.digest,
                    ));
                    if byzantine {
                        continue;
                    }
                    self.check_committed(id, &committed);
                }
                Output::Reply {
                    seq,
                    request_digest,
                    reply,
                    ..
                } => self.on_reply(id, seq, request_digest, reply),
                Output::StableCheckpoint { .. } => {}
                Output::StateTransferred { seq, .. } => {
                    self.log(|| format!("r{id} state transferred to {seq}"));
                    self.nodes[id as usize].disk.blocks.clear();
                }
            }
        }
    }

    /// A reply from replica `id` reaches the request's client (unless lost while faults are
    /// active); f+1 matching replies from honest replicas answer the request.
    fn on_reply(&mut self, id: ReplicaId, seq: u64, request_digest: Hash, reply: Vec<u8>) {
        if self.nodes[id as usize].byzantine {
            return;
        }
        if self.faults_active && self.rng.gen_bool(self.params.loss) {
            return;
        }
        let Some(&index) = self.request_index.get(&request_digest) else {
            self.fail(
                FailureKind::Forged,
                format!("r{id} replied to a request never submitted"),
            );
            return;
        };
        let f = (self.n() - 1) / 3;
        let entry = &mut self.requests[index];
        if entry.answered {
            return;
        }
        entry.replies.insert(id, (seq, reply));
        let (seq, reply) = &entry.replies[&id];
        let matching = entry
            .replies
            .values()
            .filter(|(s, r)| s == seq && r == reply)
            .count();
        if matching > f {
            entry.answered = true;
            entry.replies.clear();
            self.must_answer.remove(&index);
        }
    }

    fn check_committed(&mut self, id: ReplicaId, committed: &crate::types::Committed) {
        let seq = committed.seq;
        match self.history.get(&seq) {
            Some((batch_digest, digest, first)) => {
                if *batch_digest != committed.batch_digest || *digest != committed.digest {
                    let first = *first;
                    self.fail(
                        FailureKind::Safety,
                        format!("seq {seq}: r{id} executed a different batch or digest than r{first}"),
                    );
                    return;
                }
            }
            None => {
                self.history
                    .insert(seq, (committed.batch_digest, committed.digest, id));
            }
        }
        for request in &committed.batch.requests {
            match self.request_index.get(&request.digest()) {
                Some(index) => {
                    let index = *index;
                    self.requests[index].executed = true;
                    self.must_execute.remove(&index);
                }
                None => {
                    self.fail(
                        FailureKind::Forged,
                        format!("seq {seq}: r{id} executed a request never submitted"),
                    );
                    return;
                }
            }
        }
    }

    /// Puts a message on the network (with the Byzantine twists of a faulty sender).
    fn transmit(&mut self, from: ReplicaId, to: Option<ReplicaId>, msg: SignedMessage) {
        let n = self.n() as ReplicaId;
        let byzantine = self.nodes[from as usize].byzantine && self.faults_active;
        let destinations: Vec<ReplicaId> = match to {
            Some(to) => vec![to],
            None => (0..n).filter(|d| *d != from).collect(),
        };
        let bytes = Arc::new(msg.to_bytes());
        if !byzantine {
            for to in destinations {
                self.network(from, to, bytes.clone());
            }
            return;
        }
        // Byzantine sender.
        let node = &mut self.nodes[from as usize];
        if node.sent.len() >= 64 {
            node.sent.remove(0);
        }
        node.sent.push(bytes.clone());
        let keypair = self.keypairs[from as usize].clone();
        let decoded = msg.message(usize::MAX);
        let equivocation = match decoded {
            // An equivocating primary: a second batch for the same (view, seq) to half the
            // replicas; it remembers the second digest to double-vote for it later.
            Ok(Message::PrePrepare { view, seq, .. }) if self.params.equivocate && msg.batch.is_some() => {
                let mut other = (**msg.batch.as_ref().expect("checked")).clone();
                other.timestamp_ms += 1;
                if other.requests.len() > 1 {
                    other.requests.pop();
                }
                let node = &mut self.nodes[from as usize];
                if node.alternatives.len() >= 64 {
                    node.alternatives.pop_first();
                }
                node.alternatives.insert((view, seq), other.digest());
                let alternative = Message::PrePrepare {
                    view,
                    seq,
                    digest: other.digest(),
                };
                Some(Arc::new(
                    alternative
                        .sign(from, &keypair)
                        .with_batch(Arc::new(other))
                        .to_bytes(),
                ))
            }
            // Double voting: prepares and commits for the other batch to the other half.
            Ok(Message::Prepare { view, seq, .. }) | Ok(Message::Commit { view, seq, .. })
                if self.params.equivocate =>
            {
                let alternative = self.nodes[from as usize].alternatives.get(&(view, seq)).copied();
                alternative.map(|digest| {
                    let vote = match msg.message(usize::MAX) {
                        Ok(Message::Prepare { .. }) => Message::Prepare { view, seq, digest },
                        _ => Message::Commit { view, seq, digest },
                    };
                    Arc::new(vote.sign(from, &keypair).to_bytes())
                })
            }
            // A lying new primary: null batches in place of the prepared ones.
            Ok(Message::NewView {
                view,
                view_changes,
                pre_prepares,
            }) if self.rng.gen_bool(0.5) => {
                let forged: Vec<SignedMessage> = pre_prepares
                    .iter()
                    .filter_map(|pp| match pp.message(usize::MAX) {
                        Ok(Message::PrePrepare { view, seq, .. }) => Some(
                            Message::PrePrepare {
                                view,
                                seq,
                                digest: crate::message::Batch::null().digest(),
                            }
                            .sign(from, &keypair)
                            .with_batch(Arc::new(crate::message::Batch::null())),
                        ),
                        _ => None,
                    })
                    .collect();
                let lie = Message::NewView {
                    view,
                    view_changes,
                    pre_prepares: forged,
                };
                Some(Arc::new(lie.sign(from, &keypair).to_bytes()))
            }
            // Amnesia: a view change that hides the prepared certificates.
            Ok(Message::ViewChange { new_view, stable, .. }) if self.rng.gen_bool(0.5) => {
                let lie = Message::ViewChange {
                    new_view,
                    stable,
                    prepared: Vec::new(),
                };
                Some(Arc::new(lie.sign(from, &keypair).to_bytes()))
            }
            _ => None,
        };
        for (i, to) in destinations.into_iter().enumerate() {
            let mut payload = bytes.clone();
            if let Some(alternative) = &equivocation {
                if i % 2 == 1 {
                    payload = alternative.clone();
                }
            }
            if self.rng.gen_bool(self.params.bad_signature) {
                let mut forged = msg.clone();
                forged.signature.0[self.rng.gen_range(0..64)] ^= 1 << self.rng.gen_range(0..8);
                payload = Arc::new(forged.to_bytes());
            }
            self.network(from, to, payload);
            if self.rng.gen_bool(self.params.garbage) {
                let len = self.rng.gen_range(0..200);
                let mut garbage = vec![0u8; len];
                self.rng.fill_bytes(&mut garbage);
                if self.rng.gen_bool(0.5) && len > 8 {
                    // A well-formed envelope around garbage, correctly signed.
                    let signature =
                        self.keypairs[from as usize].sign(crate::constants::SIGNING_DOMAIN, &garbage);
                    let envelope = SignedMessage {
                        signer: from,
                        payload: Arc::new(garbage),
                        signature,
                        batch: None,
                    };
                    garbage = envelope.to_bytes();
                }
                self.network(from, to, Arc::new(garbage));
            }
            if self.rng.gen_bool(self.params.replay) {
                let node = &self.nodes[from as usize];
                let old = node.sent[self.rng.gen_range(0..node.sent.len())].clone();
                self.network(from, to, old);
            }
        }
    }

    fn network(&mut self, from: ReplicaId, to: ReplicaId, bytes: Arc<Vec<u8>>) {
        let mut copies = 1;
        let mut delay_min = 1;
        let mut delay_max = 3;
        if self.faults_active {
            if let Some(side) = &self.partition {
                if side[from as usize] != side[to as usize] {
                    return;
                }
            }
            if self.rng.gen_bool(self.params.loss) {
                return;
            }
            if self.rng.gen_bool(self.params.duplicate) {
                copies = 2;
            }
            delay_min = self.params.delay_min_ms;
            delay_max = self.params.delay_max_ms;
            if self.params.slow == Some(from) || self.params.slow == Some(to) {
                delay_min += 20;
                delay_max += 60;
            }
        }
        for _ in 0..copies {
            let delay = self.rng.gen_range(delay_min..=delay_max);
            self.schedule(
                self.now + delay,
                Event::Deliver {
                    to,
                    from,
                    bytes: bytes.clone(),
                },
            );
        }
    }
}

/// The test app's request generator: a payload whose first byte is an amount, then the
/// client and nonce (unique), then some filler.
pub fn test_request(rng: &mut ChaCha8Rng, client: u64, nonce: u64) -> Request {
    let mut payload = vec![rng.gen_range(0..200u8)];
    payload.extend_from_slice(&client.to_le_bytes());
    payload.extend_from_slice(&nonce.to_le_bytes());
    let filler = rng.gen_range(0..32);
    payload.extend((0..filler).map(|_| rng.gen::<u8>()));
    Request { client, payload }
}

/// Prints a failing seed's line with its replay command.
pub fn print_failure<A>(report: &SeedReport, options: &SimOptions<A>) {
    if let Some((kind, detail)) = &report.failure {
        let replay = options
            .replay_command
            .replace("{seed}", &report.seed.to_string())
            .replace("{replicas}", &report.replicas.to_string());
        println!(
            "FAIL seed={} replicas={} kind={kind:?}: {detail}\n  params: {}\n  replay: {replay}",
            report.seed, report.replicas, report.params
        );
    }
}

/// Runs `count` seeds starting at `first_seed`, printing one line per failing seed (with its
/// replay command) and the summary line `seeds=N failures=F`. Returns the reports.
pub fn run_seeds<A, MA, MR>(
    first_seed: u64,
    count: u64,
    replicas: usize,
    make_app: MA,
    make_request: MR,
    options: &SimOptions<A>,
) -> Vec<SeedReport>
where
    A: App,
    MA: FnMut(ReplicaId) -> A + Clone,
    MR: FnMut(&mut ChaCha8Rng, u64, u64) -> Request + Clone,
{
    let mut reports = Vec::with_capacity(count as usize);
    for seed in first_seed..first_seed + count {
        let report = run_seed(seed, replicas, make_app.clone(), make_request.clone(), options);
        print_failure(&report, options);
        reports.push(report);
    }
    let failures = reports.iter().filter(|r| !r.ok()).count();
    let sum = |f: fn(&SeedReport) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "replicas={replicas} requests_executed={}/{} requests_answered={} view_changes={} state_transfers={} crashes={} messages={} \
         simulated_ms={}",
        sum(|r| r.requests_executed),
        sum(|r| r.requests_submitted),
        sum(|r| r.requests_answered),
        sum(|r| r.view_changes),
        sum(|r| r.state_transfers),
        sum(|r| r.crashes),
        sum(|r| r.messages_delivered),
        sum(|r| r.simulated_ms),
    );
    println!("seeds={} failures={}", reports.len(), failures);
    reports
}
