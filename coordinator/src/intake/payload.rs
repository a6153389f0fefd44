//! One upload's payload on its own blocking thread ([`PayloadTask`]): each chunk is appended
//! to the temporary blob (hashed as written), then handed to the streaming decoder, which
//! checks it against the base layout (names, shapes, codec, finite values, trailing checksum)
//! and gives the values to the L2 norm and to the round's running mean as they arrive. Each
//! byte is hashed once: the blob's hash state is kept where the body ends, and the decoder
//! compares the trailing checksum with it ([`delta::decode_prehashed`]).
//!
//! Memory per upload is a few chunks whatever the model size: the async side waits while
//! [`QUEUE`] chunks are queued, so a slow disk or decoder slows the plant down instead of
//! filling memory. A refused payload stops the task at once, and the next [`PayloadTask::push`]
//! returns its reason; a cut-off stream ends it with a truncation error. Whatever stops it,
//! the values it gave the running mean are taken out again before its file is removed, or,
//! for a cut-off stream, before its received prefix is held for a resume (`Incoming::hold`).
//!
//! A resumed upload first replays its held prefix from disk through the same hash and decoder
//! (at most [`REPLAY_BYTES`] at a time), then continues with the stream's chunks.

use std::io::{self, Read};
use std::sync::Arc;

use fedinspect_common::delta::{self, DeltaSink, PrehashedRead, CHECKSUM_LEN};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::resume::Start;
use crate::error::CoreError;
use crate::hub::{Feed, OpenRound};
use crate::storage::{BlobStore, DeltaFile, Incoming, StorageError};

/// Chunks queued between the gRPC stream and the decoder.
const QUEUE: usize = 2;

/// Bytes of a held prefix read back at a time.
const REPLAY_BYTES: usize = 1 << 16;

/// The thread decoding one upload, and the queue that feeds it.
pub struct PayloadTask {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    task: Option<JoinHandle<Result<Decoded, CoreError>>>,
}

/// A payload that decoded completely: its temporary file (not yet synced), its L2 norm and
/// its open entry in the running mean.
pub struct Decoded {
    pub incoming: Incoming,
    pub l2_norm: f64,
    pub feed: Option<Feed>,
}

impl PayloadTask {
    /// Starts decoding an upload for `round` into its resumable file in `blobs` (a new one,
    /// or the held prefix `start` names, replayed first).
    pub fn spawn(
        blobs: BlobStore,
        round: Arc<OpenRound>,
        feed: Option<Feed>,
        start: Start,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::task::spawn_blocking(move || run(&blobs, &round, feed, start, rx));
        Self {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Queues the next chunk; if the task already refused the payload, returns why.
    pub async fn push(&mut self, chunk: Vec<u8>) -> Result<(), CoreError> {
        let tx = self.tx.as_ref().expect("push before finish");
        if tx.send(chunk).await.is_ok() {
            return Ok(());
        }
        match self.finish_inner().await {
            Err(e) => Err(e),
            Ok(_) => Err(CoreError::Internal(
                "the payload decoder stopped before the stream ended".into(),
            )),
        }
    }

    /// Ends the stream and waits for the decoder's verdict.
    pub async fn finish(mut self) -> Result<Decoded, CoreError> {
        self.finish_inner().await
    }

    async fn finish_inner(&mut self) -> Result<Decoded, CoreError> {
        self.tx = None;
        let task = self.task.take().expect("finished once");
        task.await
            .map_err(|e| CoreError::Internal(format!("the payload decoder failed: {e}")))?
    }
}

/// The blocking body: decode everything that arrives, then hand the file over or clean up.
fn run(
    blobs: &BlobStore,
    round: &OpenRound,
    mut feed: Option<Feed>,
    start: Start,
    rx: mpsc::Receiver<Vec<u8>>,
) -> Result<Decoded, CoreError> {
    let incoming = match blobs.resumable(start.claim, start.mark) {
        Ok(i) => i,
        Err(e) => {
            if let Some(feed) = feed {
                feed.discard_empty();
            }
            return Err(e.into());
        }
    };
    let codec = round.record.plan.codec;
    let total_len = delta::encoded_len(&round.layout, codec);
    let mut tee = Tee {
        rx,
        chunk: Vec::new(),
        pos: 0,
        incoming,
        failed: None,
        body_len: total_len.saturating_sub(CHECKSUM_LEN as u64),
        body_sha256: None,
        ended: false,
    };
    let mut sink = Sink {
        squares: 0.0,
        feed: feed.as_mut(),
    };
    let result = delta::decode_prehashed(&mut tee, &round.layout, Some(codec), &mut sink);
    let squares = sink.squares;
    let Tee {
        incoming,
        failed,
        ended,
        ..
    } = tee;
    match result {
        Ok(_) => Ok(Decoded {
            incoming,
            l2_norm: squares.sqrt(),
            feed,
        }),
        Err(e) => {
            if let Some(feed) = feed {
                take_out(feed, incoming.path(), round);
            }
            // Cut off before its end, with every received byte written: keep the prefix.
            let got = incoming.len();
            if failed.is_none() && ended && got < total_len {
                match incoming.hold() {
                    Ok(held) => {
                        tracing::info!(held, "upload cut off; its prefix is kept for a resume")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep a cut-off upload's prefix; the plant will send it again from byte 0")
                    }
                }
                return Err(CoreError::Truncated {
                    got,
                    expected: total_len,
                });
            }
            Err(match failed {
                Some(storage) => storage.into(),
                None => CoreError::from_delta(e),
            })
        }
    }
}

/// Subtracts what an attempt delivered, read back from its (possibly partial) file.
pub fn take_out(feed: Feed, path: &std::path::Path, round: &OpenRound) {
    match DeltaFile::open_prefix(path, &round.layout, round.record.plan.codec) {
        Ok(file) => feed.discard(&file),
        // The header never arrived whole, so no value was delivered.
        Err(_) => feed.discard_empty(),
    }
}

/// A `Read` over the queued chunks that appends each chunk to the temporary blob before the
/// decoder sees a byte of it, so the file always holds everything decoded. The blob hashes
/// what is written; its digest where the body ends is the decoder's checksum reference.
struct Tee {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    incoming: Incoming,
    /// Why writing the file failed, reported instead of the decoder's I/O error.
    failed: Option<StorageError>,
    /// Length of a well-formed payload without its trailing checksum (round's layout, codec).
    body_len: u64,
    /// SHA-256 of the first `body_len` bytes, once they are written.
    body_sha256: Option<[u8; 32]>,
    /// Whether the stream ended (its sender was dropped).
    ended: bool,
}

impl Tee {
    /// Appends `chunk` to the blob, keeping the hash of the body where it ends.
    fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        let before = self.incoming.len();
        let end = before + chunk.len() as u64;
        if before < self.body_len && self.body_len <= end {
            let (body, rest) = chunk.split_at((self.body_len - before) as usize);
            self.incoming.write(body)?;
            self.body_sha256 = Some(self.incoming.digest().0);
            if rest.is_empty() {
                return Ok(());
            }
            return self.incoming.write(rest);
        }
        self.incoming.write(chunk)
    }

    /// Reads the next piece of a resumed upload's held prefix into `self.chunk`, never across
    /// the end of the body, so the body's hash is taken exactly where it ends.
    fn replay(&mut self) -> Result<(), StorageError> {
        let len = self.incoming.len();
        let limit = match self.body_len.checked_sub(len) {
            Some(0) | None => REPLAY_BYTES,
            Some(left) => usize::try_from(left).unwrap_or(REPLAY_BYTES),
        };
        self.chunk.resize(REPLAY_BYTES, 0);
        let n = self.incoming.replay(&mut self.chunk, limit)?;
        self.chunk.truncate(n);
        if self.incoming.len() == self.body_len {
            self.body_sha256 = Some(self.incoming.digest().0);
        }
        Ok(())
    }
}

impl PrehashedRead for Tee {
    fn sha256_of_first(&self, len: u64) -> Option<[u8; 32]> {
        self.body_sha256.filter(|_| len == self.body_len)
    }
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.incoming.to_replay() > 0 {
                if let Err(e) = self.replay() {
                    let io = io::Error::other(e.to_string());
                    self.failed = Some(e);
                    return Err(io);
                }
                self.pos = 0;
                continue;
            }
            let Some(chunk) = self.rx.blocking_recv() else {
                self.ended = true;
                return Ok(0); // the stream ended
            };
            if let Err(e) = self.write(&chunk) {
                let io = io::Error::other(e.to_string());
                self.failed = Some(e);
                return Err(io);
            }
            self.chunk = chunk;
            self.pos = 0;
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Receives the decoded values: the sum of squares (for the norm bound) in stream order, and
/// the running mean.
struct Sink<'a> {
    squares: f64,
    feed: Option<&'a mut Feed>,
}

impl DeltaSink for Sink<'_> {
    fn values(&mut self, name: &str, offset: usize, values: &[f32]) {
        self.squares += values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>();
        if let Some(feed) = self.feed.as_mut() {
            feed.add(name, offset, values);
        }
    }
}
