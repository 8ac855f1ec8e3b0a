//! The Rust side of the spend script ([`super::lua::SPEND`]): the keys and
//! arguments a [`Spend`] becomes, and the [`SpendAnswer`] its reply becomes.
//!
//! Depends on `usage`, `entitlement`, [`StoreError`] and [`super::keys`].

use chrono::{DateTime, Utc};
use redis::{Script, ScriptInvocation};

use super::keys::{Keys, from_millis, millis, window_ms};
use crate::entitlement::{Few, Window};
use crate::store::StoreError;
use crate::usage::{CreditBalance, MAX_COST, QuotaUsage, Spend, SpendAnswer};

/// The script call for `spend`, and per quota its calendar window's end
/// (`None` for rolling windows, whose times the script answers).
pub(super) fn invocation<'a>(
    script: &'a Script,
    keys: &Keys,
    spend: &Spend,
) -> (ScriptInvocation<'a>, Vec<Option<DateTime<Utc>>>) {
    let mut inv = script.prepare_invoke();
    inv.arg(spend.cost)
        .arg(spend.credits.map_or_else(String::new, |c| c.to_string()))
        .arg(match (spend.dry_run, spend.shadow) {
            (true, _) => 1u8,
            (false, true) => 2,
            (false, false) => 0,
        })
        .arg(spend.quotas.len());
    let mut ends = Vec::with_capacity(spend.quotas.len());
    for q in &spend.quotas {
        for key in keys.window(&spend.account, q, spend.now) {
            inv.key(key);
        }
        match q.window {
            Window::Calendar(p) => {
                let end = p.bounds(spend.now).1;
                inv.arg("c").arg(q.hard_limit()).arg(millis(end));
                ends.push(Some(end));
            }
            Window::Rolling(d) => {
                inv.arg("r").arg(q.hard_limit()).arg(window_ms(d));
                ends.push(None);
            }
        }
    }
    inv.key(keys.credits(&spend.account));
    (inv, ends)
}

/// Reads the script's reply (see [`super::lua::SPEND`]) to `spend`.
pub(super) fn answer(out: &[i64], spend: &Spend, ends: &[Option<DateTime<Utc>>]) -> Result<SpendAnswer, StoreError> {
    if out.len() != 3 + 4 * spend.quotas.len() {
        return Err(StoreError::Corrupt(format!("spend script returned {} values", out.len())));
    }
    let mut quotas = Few::with_capacity(spend.quotas.len());
    for (c, end) in out[3..].chunks_exact(4).zip(ends) {
        let used =
            u64::try_from(c[0]).map_err(|_| StoreError::Corrupt(format!("spend script answered used = {}", c[0])))?;
        let (resets_at, retry_at) = match end {
            Some(end) => (*end, *end),
            None => (script_time(c[2])?, script_time(c[3])?),
        };
        quotas.push(QuotaUsage { used, exceeded: c[1] == 1, resets_at, retry_at });
    }
    let credits = match spend.credits {
        Some(_) => Some(CreditBalance {
            balance: u64::try_from(out[1])
                .map_err(|_| StoreError::Corrupt(format!("spend script answered balance = {}", out[1])))?,
            sufficient: out[2] == 1,
        }),
        None => None,
    };
    Ok(SpendAnswer { spent: out[0] == 1, quotas, credits })
}

/// A time the spend script answered, in ms; one outside chrono's range is corrupt.
fn script_time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    from_millis(ms).ok_or_else(|| StoreError::Corrupt(format!("spend script answered the instant {ms}")))
}

/// Whether `spend` cannot fit whatever the counters hold: a cost or credit
/// cost above [`MAX_COST`] (the script refuses such arguments).
pub(super) fn is_oversized(spend: &Spend) -> bool {
    spend.cost > MAX_COST || spend.credits.is_some_and(|c| c > MAX_COST)
}

/// What an [oversized](is_oversized) spend answers without asking Redis: a
/// cost above [`MAX_COST`] is exceeded and a credit cost above it insufficient,
/// so the counters are not read (their `used` and the balance show as 0).
pub(super) fn oversized(spend: &Spend) -> SpendAnswer {
    let too_big = spend.cost > MAX_COST;
    let quotas = spend
        .quotas
        .iter()
        .map(|q| {
            let end = match q.window {
                Window::Calendar(p) => p.bounds(spend.now).1,
                Window::Rolling(d) => chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| spend.now.checked_add_signed(d))
                    .unwrap_or(spend.now),
            };
            QuotaUsage { used: 0, exceeded: too_big, resets_at: end, retry_at: end }
        })
        .collect();
    let credits = spend.credits.map(|c| CreditBalance { balance: 0, sufficient: c <= MAX_COST });
    SpendAnswer { spent: false, quotas, credits }
}
