//! The path normaliser: `check_path`, `match_form` and `resolve` on any UTF-8.
//!
//! Invariants (a panic is a counterexample):
//! - `check_path` and `match_form` never panic;
//! - `resolve` is idempotent: the upstream model is a normal form itself;
//! - a path `check_path` accepts is the path a permissive upstream serves:
//!   `resolve(p) == match_form(p)`, so tollgate meters what is served.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::route::{check_path, match_form, path_only, resolve};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = std::str::from_utf8(data) else { return };
    let accepted = check_path(p).is_ok();
    let form = match_form(p);
    let once = resolve(p);
    assert_eq!(resolve(&once), once, "resolve is not idempotent on {p:?}");
    if accepted {
        assert_eq!(once, form, "accepted path {p:?} resolves elsewhere than it is routed");
    }
    // What the authorizer does with a whole `:path` (query included).
    let _ = check_path(path_only(p));
});
