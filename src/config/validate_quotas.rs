//! Validation of a quota list (`plans.<name>.quotas`, `accounts[i].quotas`).
//!
//! Each quota is checked by [`Quota::new`], the one check the internal API
//! uses too; this adds what only a list can break (duplicates).
//!
//! May use [`super::schema`], the shared rules in [`super::validate`] and
//! `entitlement`.

use super::schema::QuotaDef;
use super::validate::{Invalid, invalid};
use crate::entitlement::Quota;

/// Each quota as [`Quota::new`] accepts it, and no two quotas on the same
/// meter and window. `path` names the list, e.g. `plans.free.quotas`.
pub(super) fn quotas(defs: &[QuotaDef], path: &str) -> Result<Vec<Quota>, Invalid> {
    let mut out: Vec<Quota> = Vec::with_capacity(defs.len());
    for (i, q) in defs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let quota = Quota::new(&q.meter, q.limit, q.period, q.per)
            .and_then(|quota| quota.soften(q.soft, q.ceiling))
            .map_err(|e| invalid(e.path(&p), e.to_string()))?;
        if out.iter().any(|o| o.meter == quota.meter && o.window == quota.window) {
            return Err(invalid(p, format!("duplicate quota {}", quota.policy_name())));
        }
        out.push(quota);
    }
    Ok(out)
}
