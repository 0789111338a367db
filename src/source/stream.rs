//! The source task: reads the replication stream, decodes pgoutput, hands events to apply.
//!
//! It owns the replication connection. Transactions the server streams before their
//! commit (protocol 2) go to [`super::spill`] and are handed on whole at their commit.
//! Besides forwarding events through a bounded channel (backpressure: when apply is busy
//! committing, we stop reading, and Postgres buffers), it answers keepalives and sends
//! standby status updates carrying only the *durable* LSN that apply publishes, never
//! what was merely received.

use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, Frame};
use super::replication::{ReplicationConnection, ReplicationError, StreamMessage};
use super::spill::{Replay, Spills};
use crate::change::SourceEvent;
use crate::change::message::PgOutputMessage;
use crate::lsn::Lsn;

/// Bytes of decoded-but-unapplied messages in flight between source and apply. The
/// channel also caps the number of events; this caps their size (large TOAST values).
const IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// The most messages and bytes handed over as one event.
const HAND_OVER_MESSAGES: usize = 512;
const HAND_OVER_BYTES: usize = 4 * 1024 * 1024;

/// Events ready to hand over, oldest first, each with its share of the byte budget.
/// Messages gather into one event while they arrive together.
#[derive(Default)]
struct Outbox {
    events: std::collections::VecDeque<(SourceEvent, usize)>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether the newest event can take no more messages.
    fn full(&self) -> bool {
        match self.events.back() {
            Some((SourceEvent::Messages { messages, .. }, bytes)) => {
                messages.len() >= HAND_OVER_MESSAGES || *bytes >= HAND_OVER_BYTES
            }
            _ => false,
        }
    }

    fn push_message(&mut self, wal_start: Lsn, message: PgOutputMessage, bytes: usize) {
        let full = self.full();
        if let Some((SourceEvent::Messages { messages, .. }, held)) = self.events.back_mut()
            && !full
        {
            messages.push((wal_start, message));
            *held = (*held + bytes).min(IN_FLIGHT_BYTES);
            return;
        }
        let event = SourceEvent::Messages {
            messages: vec![(wal_start, message)],
            budget: None,
        };
        self.events.push_back((event, bytes.min(IN_FLIGHT_BYTES)));
    }

    fn push(&mut self, event: SourceEvent) {
        self.events.push_back((event, 0));
    }

    /// Bytes the oldest event needs from the budget.
    fn front_bytes(&self) -> usize {
        self.events.front().map_or(0, |(_, bytes)| *bytes)
    }

    fn pop(&mut self) -> Option<SourceEvent> {
        self.events.pop_front().map(|(event, _)| event)
    }

    fn clear(&mut self) {
        self.events.clear();
    }
}

/// How long a stop request waits for the transaction being read to complete.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Streams until cancelled, the apply side goes away, or an error occurs. `spills` is set
/// when the server was asked to stream running transactions (protocol 2).
pub async fn run(
    mut conn: ReplicationConnection,
    events: mpsc::Sender<SourceEvent>,
    mut durable: watch::Receiver<Lsn>,
    cancel: CancellationToken,
    status_interval: Duration,
    mut spills: Option<Spills>,
) -> Result<(), ReplicationError> {
    let mut ticker = tokio::time::interval(status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Outbox::default();
    let mut events = Some(events);
    let mut last_sent = Lsn::ZERO;
    // What we have read: commit end LSNs and keepalive positions.
    let mut received = Lsn::ZERO;
    // Between a Begin and its Commit.
    let mut in_transaction = false;
    // Set once a stop was requested: read on until the current transaction is complete
    // (so it can be committed), at most until this instant.
    let mut stop_by: Option<tokio::time::Instant> = None;
    let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES));
    // A committed streamed transaction being read back from its spill file.
    let mut replay: Option<Replay> = None;
    loop {
        if let Some(deadline) = stop_by {
            let finished = !in_transaction || tokio::time::Instant::now() >= deadline;
            if events.is_some() && pending.is_empty() && finished {
                // Closing the channel tells apply to commit what is complete.
                events = None;
                replay = None;
            }
        }
        if pending.is_empty()
            && events.is_some()
            && let Some(r) = &mut replay
        {
            while !pending.full() {
                let Some(next) = r.next_replayed()? else {
                    replay = None;
                    break;
                };
                if matches!(next.message, PgOutputMessage::Commit { .. }) {
                    in_transaction = false;
                }
                pending.push_message(next.wal_start, next.message, next.bytes);
            }
        }
        let pending_bytes = pending.front_bytes();
        // The reserve future owns its own sender clone, so stopping (events = None) closes
        // the channel as soon as this iteration's futures are dropped.
        let sender = events.clone();
        let budget_for_send = budget.clone();
        // Branch order is priority order: stop, tell the server our durable position,
        // hand over what we hold, and only then read more.
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if stop_by.is_none() => {
                stop_by = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            _ = tokio::time::sleep_until(stop_by.unwrap_or_else(tokio::time::Instant::now)), if stop_by.is_some() && events.is_some() => {
                // The grace period is over in the middle of a transaction: stop anyway;
                // apply commits nothing of the partial batch and it is read again later.
                pending.clear();
                events = None;
            }
            changed = durable.changed() => {
                if changed.is_err() {
                    // Apply has finished: report the final durable position and leave.
                    let lsn = *durable.borrow();
                    conn.send_status(received, lsn).await?;
                    tracing::info!(flushed = %lsn, "final position reported to the source");
                    conn.close().await;
                    return Ok(());
                }
                let lsn = *durable.borrow_and_update();
                if lsn > last_sent {
                    conn.send_status(received, lsn).await?;
                    last_sent = lsn;
                }
            }
            _ = ticker.tick() => {
                let lsn = *durable.borrow();
                conn.send_status(received, lsn).await?;
                last_sent = lsn;
            }
            slot = async move {
                let bytes = budget_for_send.acquire_many_owned(pending_bytes as u32).await.ok()?;
                let permit = sender?.reserve_owned().await.ok()?;
                Some((bytes, permit))
            }, if !pending.is_empty() => {
                match slot {
                    Some((bytes, permit)) => {
                        if let Some(mut event) = pending.pop() {
                            if let SourceEvent::Messages { budget, .. } = &mut event {
                                *budget = Some(bytes);
                            }
                            permit.send(event);
                        }
                    }
                    None => {
                        // Apply is gone (it failed); the pipeline reports its error.
                        return Ok(());
                    }
                }
            }
            message = conn.recv(), if pending.is_empty() && replay.is_none() && events.is_some() => {
                let durable_now = *durable.borrow();
                let mut message = Some(message?);
                let mut read = 0;
                // What else has arrived already goes into the same hand-over.
                while let Some(next) = message.take() {
                    read += 1;
                    let mut position = Position {
                        received: &mut received,
                        in_transaction: &mut in_transaction,
                        durable: durable_now,
                    };
                    match stage(next, &mut position, &mut spills)? {
                        Staged::Message { wal_start, message, bytes } => {
                            pending.push_message(wal_start, message, bytes);
                        }
                        Staged::Keepalive { wal_end, reply_requested } => {
                            if reply_requested {
                                conn.send_status(received, durable_now).await?;
                                last_sent = durable_now;
                            }
                            pending.push(SourceEvent::Keepalive { wal_end });
                        }
                        Staged::Spilled => {}
                        Staged::Committed(r) => {
                            replay = Some(r);
                            break;
                        }
                    }
                    if pending.full() || read >= HAND_OVER_MESSAGES || stop_by.is_some() {
                        break;
                    }
                    message = conn.recv().now_or_never().transpose()?;
                }
            }
        }
    }
}

/// The spill files, when streaming was asked for.
fn streamed(spills: &mut Option<Spills>) -> Result<&mut Spills, ReplicationError> {
    spills.as_mut().ok_or_else(|| {
        ReplicationError::Protocol(
            "the server streams a running transaction, which was not asked for".into(),
        )
    })
}

/// What a stream message became.
enum Staged {
    /// A message to hand over.
    Message {
        wal_start: Lsn,
        message: PgOutputMessage,
        /// Its share of the in-flight byte budget.
        bytes: usize,
    },
    Keepalive {
        wal_end: Lsn,
        /// The server asked for a status update now.
        reply_requested: bool,
    },
    /// Part of a running transaction, kept in its spill file.
    Spilled,
    /// A streamed transaction committed: hand it over from its spill file.
    Committed(Replay),
}

/// What the task knows of the stream's position.
struct Position<'a> {
    /// Commit ends and keepalive positions read so far.
    received: &'a mut Lsn,
    /// Between a Begin and its Commit (or reading a committed streamed transaction back).
    in_transaction: &'a mut bool,
    durable: Lsn,
}

impl Position<'_> {
    fn receive(&mut self, lsn: Lsn) {
        *self.received = (*self.received).max(lsn);
        crate::telemetry::lag_bytes(self.received.as_i64(), self.durable.as_i64());
    }
}

/// Decodes a stream message into the event for apply (or into a running transaction's
/// spill file), noting transaction boundaries and the position received so far.
fn stage(
    message: StreamMessage,
    position: &mut Position<'_>,
    spills: &mut Option<Spills>,
) -> Result<Staged, ReplicationError> {
    let (wal_start, data) = match message {
        StreamMessage::XLogData {
            wal_start, data, ..
        } => (wal_start, data),
        StreamMessage::Keepalive {
            wal_end,
            reply_requested,
        } => {
            position.receive(wal_end);
            return Ok(Staged::Keepalive {
                wal_end,
                reply_requested,
            });
        }
    };
    let frame = match spills {
        Some(s) => pgoutput::decode_frame(&data, s.in_block())?,
        None => Frame::Message(pgoutput::decode(&data)?),
    };
    match frame {
        Frame::Message(message) => {
            match &message {
                PgOutputMessage::Begin { .. } => *position.in_transaction = true,
                PgOutputMessage::Commit { end_lsn, .. } => {
                    *position.in_transaction = false;
                    position.receive(*end_lsn);
                }
                _ => {}
            }
            Ok(Staged::Message {
                wal_start,
                message,
                bytes: data.len().max(1),
            })
        }
        Frame::StreamStart { xid, first_segment } => {
            streamed(spills)?.start(xid, first_segment)?;
            Ok(Staged::Spilled)
        }
        Frame::StreamStop => {
            streamed(spills)?.stop()?;
            Ok(Staged::Spilled)
        }
        Frame::Streamed { xid, message } => {
            streamed(spills)?.write(xid, wal_start, &message)?;
            Ok(Staged::Spilled)
        }
        Frame::StreamAbort { xid, subxid } => {
            streamed(spills)?.abort(xid, subxid)?;
            Ok(Staged::Spilled)
        }
        Frame::StreamCommit {
            xid,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            let replay = streamed(spills)?.commit(xid, commit_lsn, end_lsn, commit_ts)?;
            *position.in_transaction = true;
            position.receive(end_lsn);
            Ok(Staged::Committed(replay))
        }
    }
}
