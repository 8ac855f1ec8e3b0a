//! The Redis outbox: each account's events in its own stream (`P{acct}:events`,
//! written by the settle script in the same atomic step as the settlement,
//! so it lives in the account's cluster slot), and an index of the accounts
//! that may have events (`Poutbox`, a sorted set scored by last write).
//!
//! Every replica consumes through the stream's consumer group `tollgate`:
//! an event is claimed by one consumer, acknowledged and deleted once its
//! sink took it; a consumer's unacknowledged events are retried by it first,
//! and taken over by another once they sat `reclaim_after` (their claimer is
//! presumed dead). The sweep visits the accounts written since the last one
//! (plus the sweeper's own unacknowledged ones) on every call, and every
//! account of the index every `reclaim_after / 2`; an account idle for
//! [`FORGET_AFTER`] with an empty stream leaves the index and its stream is
//! deleted (a writer indexes before it writes, so a fresh write keeps it).
//! Depends on `keys`, `connection` and `usage`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::Script;

use super::connection::{Conn, unavailable};
use super::keys::Keys;
use crate::store::StoreError;
use crate::usage::OutboxEvent;

/// How long an emptied account stays indexed after its last write.
pub(super) const FORGET_AFTER: Duration = Duration::from_secs(300);

/// How long an index write stands for the writer: well under
/// [`FORGET_AFTER`] (so no consumer forgets the account meanwhile), and
/// within the sweep's 2 s look-back (so the next sweep still visits it).
const REINDEX_AFTER: Duration = Duration::from_secs(1);

/// The most accounts whose index write a replica remembers (beyond, it prunes, then writes again).
const MAX_INDEXED: usize = 100_000;

/// Accounts read from the index per call of a full sweep.
const PAGE: isize = 200;

/// Where the sweep stands.
#[derive(Debug)]
pub(super) struct Sweep {
    /// The index score (ms) from which accounts count as written since the last call.
    since_ms: i64,
    /// When the next full pass starts, and where it is.
    full_at: Instant,
    offset: isize,
    /// Accounts with events this replica claimed and has not acknowledged.
    mine: HashSet<String>,
    /// Accounts this replica indexed, and when.
    indexed: std::collections::HashMap<String, Instant>,
}

impl Default for Sweep {
    fn default() -> Self {
        Self { since_ms: 0, full_at: Instant::now(), offset: 0, mine: HashSet::new(), indexed: Default::default() }
    }
}

/// The scripts the outbox runs.
#[derive(Debug)]
pub(super) struct Scripts {
    claim: Script,
    forget: Script,
    drop: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            claim: Script::new(super::lua::OUTBOX_CLAIM),
            forget: Script::new(super::lua::OUTBOX_FORGET),
            drop: Script::new(super::lua::OUTBOX_DROP),
        }
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Indexes `account` as written now (before the write: see the module doc),
/// unless this replica did so less than [`REINDEX_AFTER`] ago: its score is
/// then recent enough that no consumer forgets it (that takes
/// [`FORGET_AFTER`] without a write), so the write is found all the same.
pub(super) async fn index(
    conn: &mut Conn,
    keys: &Keys,
    sweep: &std::sync::Mutex<Sweep>,
    account: &str,
) -> Result<(), StoreError> {
    let now = Instant::now();
    {
        let s = sweep.lock().unwrap_or_else(|e| e.into_inner());
        if s.indexed.get(account).is_some_and(|at| now.duration_since(*at) < REINDEX_AFTER) {
            return Ok(());
        }
    }
    redis::cmd("ZADD")
        .arg(keys.outbox())
        .arg(now_ms())
        .arg(account)
        .query_async::<()>(conn)
        .await
        .map_err(unavailable)?;
    let mut s = sweep.lock().unwrap_or_else(|e| e.into_inner());
    if s.indexed.len() >= MAX_INDEXED {
        s.indexed.retain(|_, at| now.duration_since(*at) < REINDEX_AFTER);
    }
    s.indexed.insert(account.to_owned(), now);
    Ok(())
}

/// Which accounts this call visits (and, for an incremental call, the
/// instant to move the sweep on to once all of them were visited); moves a
/// full pass on.
async fn accounts(
    conn: &mut Conn,
    keys: &Keys,
    sweep: &std::sync::Mutex<Sweep>,
    reclaim_after: Duration,
) -> Result<(Vec<String>, Option<i64>), StoreError> {
    let (full, offset, since) = {
        let s = sweep.lock().unwrap_or_else(|e| e.into_inner());
        (s.full_at <= Instant::now(), s.offset, s.since_ms)
    };
    let started = now_ms();
    let found: Vec<String> = if full {
        redis::cmd("ZRANGE")
            .arg(keys.outbox())
            .arg(offset)
            .arg(offset + PAGE - 1)
            .query_async(conn)
            .await
            .map_err(unavailable)?
    } else {
        // A little overlap: a write indexed just before the last call began.
        redis::cmd("ZRANGEBYSCORE")
            .arg(keys.outbox())
            .arg(since.saturating_sub(2000))
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(unavailable)?
    };
    let mut s = sweep.lock().unwrap_or_else(|e| e.into_inner());
    if full {
        if (found.len() as isize) < PAGE {
            s.offset = 0;
            s.full_at = Instant::now() + reclaim_after / 2;
        } else {
            s.offset += PAGE;
        }
    }
    // This replica's own unacknowledged events first: a failed POST is retried before anything new.
    let mut visit: Vec<String> = s.mine.iter().cloned().collect();
    visit.extend(found.into_iter().filter(|a| !s.mine.contains(a)));
    Ok((visit, (!full).then_some(started)))
}

/// Claims up to `max` events for `consumer` (see the module doc).
pub(super) async fn claim(
    conn: &mut Conn,
    keys: &Keys,
    scripts: &Scripts,
    sweep: &std::sync::Mutex<Sweep>,
    consumer: &str,
    max: usize,
    reclaim_after: Duration,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let mut out = Vec::new();
    let idle_ms = u64::try_from(reclaim_after.as_millis()).unwrap_or(u64::MAX);
    let (visit, moved_to) = accounts(conn, keys, sweep, reclaim_after).await?;
    let mut all_visited = true;
    for account in visit {
        if out.len() >= max {
            // The rest wait for the next call: the sweep does not move past them.
            all_visited = false;
            break;
        }
        let stream = keys.events(&account);
        let before = now_ms().saturating_sub(FORGET_AFTER.as_millis() as i64);
        let reply: Vec<String> = scripts
            .claim
            .key(&stream)
            .arg(consumer)
            .arg(max - out.len())
            .arg(idle_ms)
            .arg(before)
            .invoke_async(conn)
            .await
            .map_err(unavailable)?;
        match reply.first().map(String::as_str) {
            Some("ok") => {
                if reply.len() > 1 {
                    sweep.lock().unwrap_or_else(|e| e.into_inner()).mine.insert(account.clone());
                }
                for pair in reply[1..].chunks_exact(2) {
                    out.push(OutboxEvent { account: account.clone(), id: pair[0].clone(), payload: pair[1].clone() });
                }
            }
            Some("idle" | "gone") => {
                let forgotten: i64 = scripts
                    .forget
                    .key(keys.outbox())
                    .arg(&account)
                    .arg(before)
                    .invoke_async(conn)
                    .await
                    .map_err(unavailable)?;
                if forgotten == 1 {
                    let _: i64 = scripts.drop.key(&stream).invoke_async(conn).await.map_err(unavailable)?;
                }
            }
            _ => return Err(StoreError::Corrupt(format!("outbox claim answered {reply:?}"))),
        }
    }
    if let (true, Some(to)) = (all_visited, moved_to) {
        sweep.lock().unwrap_or_else(|e| e.into_inner()).since_ms = to;
    }
    Ok(out)
}

/// Acknowledges and deletes delivered events.
pub(super) async fn ack(
    conn: &mut Conn,
    keys: &Keys,
    sweep: &std::sync::Mutex<Sweep>,
    events: &[OutboxEvent],
) -> Result<(), StoreError> {
    let mut by_account: Vec<(&str, Vec<&str>)> = Vec::new();
    for e in events {
        match by_account.iter_mut().find(|(a, _)| *a == e.account) {
            Some((_, ids)) => ids.push(&e.id),
            None => by_account.push((&e.account, vec![&e.id])),
        }
    }
    for (account, ids) in by_account {
        let stream = keys.events(account);
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&stream).arg("tollgate").arg(&ids).ignore();
        pipe.cmd("XDEL").arg(&stream).arg(&ids).ignore();
        pipe.query_async::<()>(conn).await.map_err(unavailable)?;
        sweep.lock().unwrap_or_else(|e| e.into_inner()).mine.remove(account);
    }
    Ok(())
}
