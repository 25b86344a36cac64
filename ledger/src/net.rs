//! The replicas' network: TCP connections carrying length-delimited MessagePack frames.
//!
//! Every connection starts with a hello frame saying who is calling: a replica (which then
//! sends consensus messages, each signed and checked by the consensus core, so a false hello
//! gains nothing) or a client (a gateway, which sends requests and block subscriptions and
//! receives replies and blocks). Each replica dials every other replica and sends on that
//! connection only; what it receives arrives on the connections the others dialled. Dialling
//! retries with capped backoff forever, and every queue is bounded: when a peer's queue is full
//! the frame is dropped, which PBFT tolerates (status messages drive retransmission).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use hoard_pbft::{ReplicaId, Request};
use hoard_types::Hash;

/// Largest frame on a replica connection (a pre-prepare carries a whole batch of requests).
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Frames waiting to go to one peer or client before new ones are dropped.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
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
    /// First frame from a replica.
    HelloReplica { id: ReplicaId },
    /// First frame from a client (a gateway).
    HelloClient { client: u64 },
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
/// each connection with `hello`. Frames that arrive while disconnected are dropped. Returns
/// when `frames` closes.
pub async fn dial_and_send(address: SocketAddr, hello: NetMessage, mut frames: mpsc::Receiver<Bytes>) {
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
        backoff = DIAL_BACKOFF_MIN;
        let mut framed = Framed::new(stream, codec());
        if framed.send(hello.encode()).await.is_err() {
            continue;
        }
        tracing::debug!(%address, "connected");
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
    }
}
