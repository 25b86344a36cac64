//! The replicas' network: TCP connections carrying length-delimited MessagePack frames.
//!
//! The replica that accepts a connection first sends a [`NetMessage::Challenge`], a fresh random
//! nonce; the caller's first frame is a hello saying who is calling, within [`HELLO_TIMEOUT`] and
//! [`HELLO_BYTES_MAX`]: a replica, which proves it by signing the nonce with its key
//! ([`hello_signed_bytes`]; the cluster file lists the keys) and then sends consensus messages
//! (each also signed, and checked by the consensus core); or a client (a gateway, which sends
//! requests and block subscriptions and receives replies and blocks), which proves its id the
//! same way with the key the cluster file lists for it under `[[clients]]`
//! ([`client_hello_signed_bytes`]; ARCHITECTURE.md, "What the replicas' network trusts"). Each replica dials
//! every other replica and sends on that connection only; what it receives arrives on the
//! connections the others dialled. Dialling retries with capped backoff forever, and every queue
//! is bounded: when a peer's queue is full the frame is dropped, which PBFT tolerates (status
//! messages drive retransmission).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use hoard_pbft::{ReplicaId, Request};
use hoard_types::{Hash, Keypair, Signature};

/// Largest frame on a replica connection (a pre-prepare carries a whole batch of requests).
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Frames waiting to go to one peer or client before new ones are dropped.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// Most bytes queued for one peer: frames are up to [`FRAME_BYTES_MAX`], so the frame count
/// alone would let a slow peer's queue hold gigabytes. Beyond it frames are dropped (PBFT
/// recovers them: retransmission, catch-up).
pub const PEER_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The sending side of one peer's queue: the frames, and how many bytes they hold.
#[derive(Clone)]
pub struct PeerQueue {
    frames: mpsc::Sender<Bytes>,
    queued_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PeerQueue {
    /// Queues `frame` unless the queue is full in frames or in bytes; false when dropped.
    pub fn try_send(&self, frame: Bytes) -> bool {
        use std::sync::atomic::Ordering;
        let len = frame.len();
        if self.queued_bytes.load(Ordering::Relaxed) + len > PEER_QUEUE_BYTES_MAX {
            return false;
        }
        self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if self.frames.try_send(frame).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// A queue of frames for one peer or client, bounded by [`PEER_QUEUE_FRAMES_MAX`] frames and
/// [`PEER_QUEUE_BYTES_MAX`] bytes.
pub fn peer_queue() -> (PeerQueue, QueueReceiver) {
    let (frames, queue) = mpsc::channel(PEER_QUEUE_FRAMES_MAX);
    let queued_bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (
        PeerQueue {
            frames,
            queued_bytes: queued_bytes.clone(),
        },
        QueueReceiver { queue, queued_bytes },
    )
}

/// Starts the task that dials `address` as replica `id` (signing each connection's challenge
/// with `key`) and sends it every frame queued on the returned queue.
pub fn spawn_peer(address: SocketAddr, id: ReplicaId, key: Keypair) -> PeerQueue {
    let (queue, receiver) = peer_queue();
    tokio::spawn(dial_and_send(address, id, key, receiver));
    queue
}

/// How long a connection may take to send its hello after it is accepted; then it is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest first frame (a hello is a few dozen bytes): nothing larger is buffered for a caller
/// that has not said who it is.
pub const HELLO_BYTES_MAX: usize = 1024;
/// The domain of a replica's hello signature.
pub const HELLO_DOMAIN: &[u8] = b"hoard/net/hello/v1";

/// What a replica's hello signs (under [`HELLO_DOMAIN`]): the nonce of the connection's
/// challenge, then the replica's id (4 bytes, big-endian).
pub fn hello_signed_bytes(nonce: &Hash, id: ReplicaId) -> [u8; 36] {
    let mut bytes = [0u8; 36];
    bytes[..32].copy_from_slice(&nonce.0);
    bytes[32..].copy_from_slice(&id.to_be_bytes());
    bytes
}

/// The domain of a client's (a gateway's) hello signature: apart from a replica's, so that
/// neither hello can stand for the other.
pub const HELLO_CLIENT_DOMAIN: &[u8] = b"hoard/net/hello-client/v1";

/// What a client's hello signs (under [`HELLO_CLIENT_DOMAIN`]): the nonce of the connection's
/// challenge, then the client's id (8 bytes, big-endian), with the key the cluster file lists
/// for that id under `[[clients]]`.
pub fn client_hello_signed_bytes(nonce: &Hash, client: u64) -> [u8; 40] {
    let mut bytes = [0u8; 40];
    bytes[..32].copy_from_slice(&nonce.0);
    bytes[32..].copy_from_slice(&client.to_be_bytes());
    bytes
}
/// Longest wait between two dial attempts.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First wait after a failed dial.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Socket buffers (the loopback ceilings in LIMITS.md need large buffers).
pub const SOCKET_BUFFER_BYTES: usize = 2 * 1024 * 1024;

/// One frame on a replica's TCP connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMessage {
    /// First frame from the replica that accepted a connection: a fresh random nonce.
    Challenge { nonce: Hash },
    /// First frame from a replica: its id, and its signature over the challenge
    /// ([`hello_signed_bytes`]).
    HelloReplica { id: ReplicaId, signature: Signature },
    /// First frame from a client (a gateway): its id, and its signature over the challenge
    /// ([`client_hello_signed_bytes`]).
    HelloClient { client: u64, signature: Signature },
    /// A signed consensus message (`hoard_pbft::SignedMessage::to_bytes`).
    Consensus(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Client to replica: order this request.
    Request(Request),
    /// Replica to client: the request was executed at `seq`, with this reply.
    Reply {
        replica: ReplicaId,
        view: u64,
        seq: u64,
        request_digest: Hash,
        #[serde(with = "serde_bytes")]
        reply: Vec<u8>,
    },
    /// Client to replica: send me every committed block from this height on.
    Subscribe { from_height: u64 },
    /// Replica to client: a committed block (`Block::encode`).
    Block {
        replica: ReplicaId,
        height: u64,
        #[serde(with = "serde_bytes")]
        block: Vec<u8>,
    },
}

impl NetMessage {
    pub fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec(self).expect("net messages encode"))
    }

    pub fn decode(bytes: &[u8]) -> Result<NetMessage, String> {
        rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The framing shared by replicas and clients.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(FRAME_BYTES_MAX)
        .new_codec()
}

/// Sets the socket options both ends use.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = socket2_ref(stream);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
}

fn socket2_ref(stream: &TcpStream) -> socket2::SockRef<'_> {
    socket2::SockRef::from(stream)
}

/// Keeps a connection to `address` open and writes every frame from `frames` to it, starting
/// each connection with the hello of replica `id`, signed over the challenge the other side
/// sent. Frames that arrive while disconnected are dropped. Returns when `frames` closes.
async fn dial_and_send(address: SocketAddr, id: ReplicaId, key: Keypair, mut frames: QueueReceiver) {
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        let stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%address, %error, "dial failed");
                // Drain what piled up meanwhile: it is stale.
                while let Ok(_stale) = frames.try_recv() {}
                if frames.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                continue;
            }
        };
        tune(&stream);
        let mut framed = Framed::new(stream, codec());
        let nonce = match read_challenge(&mut framed).await {
            Ok(nonce) => nonce,
            Err(error) => {
                tracing::debug!(%address, %error, "no challenge; redialling");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                continue;
            }
        };
        let hello = NetMessage::HelloReplica {
            id,
            signature: key.sign(HELLO_DOMAIN, &hello_signed_bytes(&nonce, id)),
        };
        if framed.send(hello.encode()).await.is_err() {
            continue;
        }
        tracing::debug!(%address, "connected");
        let opened = std::time::Instant::now();
        loop {
            let Some(frame) = frames.recv().await else { return };
            if let Err(error) = framed.feed(frame).await {
                tracing::debug!(%address, %error, "send failed; redialling");
                break;
            }
            // Write whatever else is queued in the same flush (fewer syscalls under load).
            let mut failed = false;
            while let Ok(frame) = frames.try_recv() {
                if framed.feed(frame).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
                break;
            }
        }
        if opened.elapsed() >= DIAL_BACKOFF_MAX {
            backoff = DIAL_BACKOFF_MIN;
        } else {
            // Lost right after the hello (refused, most likely: a key the peer's cluster file
            // does not list): redial with backoff, not in a loop.
            tracing::warn!(%address, "peer closed the connection soon after the hello; redialling");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
        }
    }
}

/// Reads the challenge a replica sends first on a connection it accepted.
pub(crate) async fn read_challenge(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
) -> Result<Hash, String> {
    use futures::StreamExt;
    let frame = tokio::time::timeout(HELLO_TIMEOUT, framed.next())
        .await
        .map_err(|_| "no challenge in time".to_string())?
        .ok_or("closed before the challenge")?
        .map_err(|e| e.to_string())?;
    match NetMessage::decode(&frame)? {
        NetMessage::Challenge { nonce } => Ok(nonce),
        other => Err(format!("expected a challenge, got {other:?}")),
    }
}

/// A peer queue's receiving side: every frame taken off it gives its bytes back.
pub struct QueueReceiver {
    queue: mpsc::Receiver<Bytes>,
    queued_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl QueueReceiver {
    fn taken(&self, frame: Bytes) -> Bytes {
        self.queued_bytes
            .fetch_sub(frame.len(), std::sync::atomic::Ordering::Relaxed);
        frame
    }

    /// The next frame; None once every sender is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.queue.recv().await?;
        Some(self.taken(frame))
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<Bytes, mpsc::error::TryRecvError> {
        let frame = self.queue.try_recv()?;
        Ok(self.taken(frame))
    }

    fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

#[cfg(test)]
mod peer_queue_tests {
    use super::*;

    /// A peer queue is bounded in bytes as well as frames, and a frame taken off it gives its
    /// bytes back.
    #[tokio::test]
    async fn a_peer_queue_drops_frames_beyond_its_bytes_and_frees_them_when_sent() {
        let (queue, mut taken) = peer_queue();
        let queued_bytes = queue.queued_bytes.clone();
        assert!(queue.try_send(Bytes::from(vec![0u8; PEER_QUEUE_BYTES_MAX - 10])));
        assert!(!queue.try_send(Bytes::from(vec![1u8; 20])), "over the byte bound");
        assert!(queue.try_send(Bytes::from(vec![2u8; 10])));
        assert_eq!(taken.recv().await.unwrap().len(), PEER_QUEUE_BYTES_MAX - 10);
        assert!(queue.try_send(Bytes::from(vec![3u8; 20])));
        assert_eq!(taken.try_recv().unwrap()[0], 2);
        assert_eq!(taken.try_recv().unwrap()[0], 3);
        assert_eq!(queued_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
