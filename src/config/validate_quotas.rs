//! Validation of a quota list (`plans.<name>.quotas`, `accounts[i].quotas`):
//! every quota rule in one function, [`quotas`], so that a shared `Quota`
//! constructor can take its place in one edit.
//!
//! May use [`super::schema`], the shared rules in [`super::validate`],
//! `entitlement` and `bounds`.

use super::schema::QuotaDef;
use super::validate::{Invalid, invalid, name};
use crate::entitlement::{MAX_WINDOW, Quota, Window};
use crate::usage::MAX_LIMIT;

/// Each quota: a valid meter name, a limit in `1..=MAX_LIMIT`, exactly one of
/// `period` (a calendar allowance) or `per` (a rolling window of 1ms to
/// [`MAX_WINDOW`]; windows are kept in whole milliseconds), and no two quotas
/// on the same meter and window. `path` names the list, e.g. `plans.free.quotas`.
pub(super) fn quotas(defs: &[QuotaDef], path: &str) -> Result<Vec<Quota>, Invalid> {
    let mut out: Vec<Quota> = Vec::with_capacity(defs.len());
    for (i, q) in defs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if q.meter.trim().is_empty() {
            return Err(invalid(format!("{p}.meter"), "must not be empty"));
        }
        name(&q.meter, &format!("{p}.meter"))?;
        if q.limit < 1 || q.limit as u64 > MAX_LIMIT {
            return Err(invalid(format!("{p}.limit"), format!("must be between 1 and {MAX_LIMIT}, got {}", q.limit)));
        }
        let window = match (q.period, q.per) {
            (Some(period), None) => Window::Calendar(period),
            (None, Some(per)) => {
                if per > MAX_WINDOW {
                    return Err(invalid(format!("{p}.per"), "must be at most 366d"));
                }
                if !crate::bounds::is_valid_window(per) {
                    return Err(invalid(format!("{p}.per"), "must be at least 1ms"));
                }
                Window::Rolling(per)
            }
            (Some(_), Some(_)) => {
                return Err(invalid(p, "set either period (a paid allowance) or per (a rate limit), not both"));
            }
            (None, None) => return Err(invalid(p, "needs period (minute|hour|day|month) or per (a duration)")),
        };
        let quota = Quota { meter: q.meter.clone(), limit: q.limit as u64, window };
        if out.iter().any(|o| o.meter == quota.meter && o.window == quota.window) {
            return Err(invalid(p, format!("duplicate quota {}", quota.policy_name())));
        }
        out.push(quota);
    }
    Ok(out)
}
