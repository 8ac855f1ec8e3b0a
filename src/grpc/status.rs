//! The one mapping from failures to gRPC statuses, for every RPC of the port.
//!
//! | failure | status | message |
//! |---|---|---|
//! | [`Invalid`] input (also an [`AccountsError::Invalid`]) | INVALID_ARGUMENT | `field: reason` |
//! | [`AccountsError::NotFound`] | NOT_FOUND | `account "…" does not exist` |
//! | [`AccountsError::PlanUnknown`], [`AccountsError::BalanceOutOfRange`] | FAILED_PRECONDITION | the error |
//! | [`AccountsError::NoRandomness`] | INTERNAL | the error |
//! | a [`StoreError`] of any kind, on any RPC | UNAVAILABLE | that the store failed, never its cause |
//!
//! A store fault is UNAVAILABLE whatever its kind: that is what a Check
//! answers under `store.on_error: error` (SPEC §3), and on the Check path a
//! record the store cannot read has always counted as the store failing, as
//! a timeout does. So `Authorize`, the account RPCs and Check agree. The
//! message says only whether retrying may help; the cause (which may name
//! accounts or record contents) is in the log, written where the call failed.
//!
//! May use: `accounts` (its errors), `authorizer` and `store` (theirs).

use tonic::Status;

use crate::accounts::{AccountsError, Invalid};
use crate::authorizer::StoreUnavailable;
use crate::store::StoreError;

/// The status of a failed store call, on any RPC.
pub fn store_failed(e: &StoreError) -> Status {
    if e.is_transient() {
        Status::unavailable("the store is unavailable; retry")
    } else {
        Status::unavailable("stored data could not be read")
    }
}

impl From<Invalid> for Status {
    fn from(e: Invalid) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<AccountsError> for Status {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::Invalid(i) => i.into(),
            AccountsError::NotFound(_) => Status::not_found(e.to_string()),
            AccountsError::PlanUnknown(_) | AccountsError::BalanceOutOfRange => {
                Status::failed_precondition(e.to_string())
            }
            AccountsError::NoRandomness => Status::internal(e.to_string()),
            AccountsError::Store(e) => store_failed(&e),
        }
    }
}

impl From<StoreUnavailable> for Status {
    fn from(e: StoreUnavailable) -> Self {
        store_failed(&e.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    #[test]
    fn every_store_fault_is_unavailable_and_keeps_its_cause_to_the_log() {
        let faults = [
            StoreError::Unavailable("connection refused to 10.0.0.7:6379".into()),
            StoreError::Timeout(Duration::from_millis(50)),
            StoreError::Corrupt("account acct_secret: missing field `plan`".into()),
        ];
        for fault in faults {
            let cause = fault.to_string();
            let statuses = [
                store_failed(&fault),
                Status::from(AccountsError::Store(clone(&fault))),
                Status::from(StoreUnavailable(clone(&fault))),
            ];
            for s in statuses {
                assert_eq!(s.code(), Code::Unavailable, "{cause}");
                assert!(!s.message().contains("acct_secret") && !s.message().contains("10.0.0.7"), "{s:?}");
            }
        }
        let corrupt = store_failed(&StoreError::Corrupt("x".into()));
        assert_eq!(corrupt.message(), "stored data could not be read", "no retry is promised");
        assert_eq!(store_failed(&StoreError::Timeout(Duration::ZERO)).message(), "the store is unavailable; retry");
    }

    fn clone(e: &StoreError) -> StoreError {
        match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Timeout(d) => StoreError::Timeout(*d),
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        }
    }

    #[test]
    fn account_errors_map_by_kind() {
        let cases = [
            (AccountsError::from(Invalid::new("plan", "unknown").under("entitlement")), Code::InvalidArgument),
            (AccountsError::NotFound("acct_ghost".into()), Code::NotFound),
            (AccountsError::PlanUnknown("gold".into()), Code::FailedPrecondition),
            (AccountsError::BalanceOutOfRange, Code::FailedPrecondition),
            (AccountsError::NoRandomness, Code::Internal),
        ];
        let messages: Vec<String> = cases
            .into_iter()
            .map(|(e, code)| {
                let s = Status::from(e);
                assert_eq!(s.code(), code, "{s:?}");
                s.message().to_owned()
            })
            .collect();
        assert_eq!(messages[0], "entitlement.plan: unknown");
        assert_eq!(messages[1], "account \"acct_ghost\" does not exist");
        assert_eq!(messages[2], "plan \"gold\" is not configured");
        assert!(messages[3].starts_with("delta: the balance would go below zero"), "{}", messages[3]);
        assert_eq!(
            Status::from(Invalid::new("", "at most 1").under("entitlement")).message(),
            "entitlement: at most 1"
        );
    }
}
