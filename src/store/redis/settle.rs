//! The Rust side of the settle script ([`super::lua::SETTLE`]): adjustments
//! grouped by what they touch (one account's once-only hash of a ten-minute slot, the
//! same counters, credits or not), each group one script call of at most
//! [`CHUNK`] items, and the answers put back in the callers' order.
//!
//! Depends on `usage`, [`StoreError`] and [`super::keys`].

use std::collections::HashMap;

use redis::{Script, ScriptInvocation};

use super::keys::{Keys, millis};
use crate::store::StoreError;
use crate::usage::{Adjustment, MAX_COST, Settled};

/// The most items one script call settles.
pub(super) const CHUNK: usize = 500;

/// One script call: the positions (in the callers' slice) it settles, and the call.
pub(super) struct Call<'a> {
    pub(super) positions: Vec<usize>,
    pub(super) invocation: ScriptInvocation<'a>,
    /// Whether it may write events (the account must be indexed first).
    pub(super) events: bool,
}

/// The calls settling `adjustments` (all of one account, checked by the caller).
pub(super) fn calls<'a>(
    script: &'a Script,
    keys: &Keys,
    adjustments: &[Adjustment],
) -> Result<Vec<Call<'a>>, StoreError> {
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    let mut index: HashMap<Vec<String>, usize> = HashMap::new();
    for (pos, adj) in adjustments.iter().enumerate() {
        if adj.delta.unsigned_abs() > MAX_COST {
            return Err(StoreError::Corrupt(format!("adjustment of {} units is above MAX_COST", adj.delta)));
        }
        // What the script's keys and shared arguments are made of.
        let mut touch = vec![keys.settled(&adj.account, adj.issued), adj.credits.to_string()];
        for p in &adj.periods {
            touch.push(keys.calendar(&adj.account, &adj.meter, *p, p.bounds(adj.issued).0));
        }
        match index.get(&touch) {
            Some(&g) => groups[g].1.push(pos),
            None => {
                index.insert(touch.clone(), groups.len());
                groups.push((touch, vec![pos]));
            }
        }
    }
    let mut out = Vec::new();
    for (_, positions) in groups {
        for chunk in positions.chunks(CHUNK) {
            let first = &adjustments[chunk[0]];
            let mut inv = script.prepare_invoke();
            inv.key(keys.settled(&first.account, first.issued))
                .key(keys.credits(&first.account))
                .key(keys.events(&first.account));
            // The latest remember-until of the group (one slot's charges share it).
            let until = chunk.iter().map(|&p| adjustments[p].remember_until).max().unwrap_or(first.remember_until);
            inv.arg(millis(until)).arg(first.outbox_limit).arg(u8::from(first.credits)).arg(first.periods.len());
            for p in &first.periods {
                let (start, end) = p.bounds(first.issued);
                inv.key(keys.calendar(&first.account, &first.meter, *p, start));
                inv.arg(millis(end));
            }
            inv.arg(chunk.len());
            let mut events = false;
            for &p in chunk {
                let adj = &adjustments[p];
                inv.arg(&adj.charge).arg(adj.delta).arg(adj.event.as_deref().unwrap_or(""));
                events |= adj.event.is_some();
            }
            // Every item of a group watches the same windows: the first's marks stand for all.
            inv.arg(first.marks.len());
            for m in &first.marks {
                inv.key(keys.mark(&first.account, &m.name));
                inv.arg(m.counter.map_or(0, |i| i + 1)).arg(m.at).arg(millis(m.until)).arg(&m.event);
            }
            events |= !first.marks.is_empty();
            out.push(Call { positions: chunk.to_vec(), invocation: inv, events });
        }
    }
    Ok(out)
}

/// Reads one call's answer (`{applied, unpaid, queued, dropped}` per item) into `answers`.
pub(super) fn answer(out: &[i64], positions: &[usize], answers: &mut [Option<Settled>]) -> Result<(), StoreError> {
    if out.len() != 4 * positions.len() {
        return Err(StoreError::Corrupt(format!("settle script returned {} values", out.len())));
    }
    let corrupt = |v: i64| StoreError::Corrupt(format!("settle script answered {v}"));
    for (item, &pos) in out.chunks_exact(4).zip(positions) {
        let settled = match item {
            [0, ..] => Settled::Duplicate,
            [1, unpaid, queued, dropped] => Settled::Applied {
                unpaid: u64::try_from(*unpaid).map_err(|_| corrupt(*unpaid))?,
                queued: u32::try_from(*queued).map_err(|_| corrupt(*queued))?,
                dropped: u32::try_from(*dropped).map_err(|_| corrupt(*dropped))?,
            },
            _ => return Err(corrupt(item[0])),
        };
        if let Some(slot) = answers.get_mut(pos) {
            *slot = Some(settled);
        }
    }
    Ok(())
}
