//! Unit tests of `config`: the demo config, that secrets never print, and the
//! secrets merge. (Every config error has a fixture in `tests/config.rs`.)

use super::*;

#[test]
fn demo_config_is_valid() {
    let c = Config::parse(DEMO_CONFIG, "demo.yaml").unwrap();
    assert_eq!(c.store.backend, Backend::Memory);
    assert!(c.policy.plans.contains_key("payg"));
    assert!(!c.accounts.is_empty());
}

#[test]
fn store_url_hides_password() {
    let u = StoreUrl("redis://user:hunter2@h:6379/0".into());
    assert_eq!(u.redacted(), "redis://user:***@h:6379/0");
    assert!(!format!("{u:?}").contains("hunter2"));
    assert_eq!(StoreUrl("redis://h:1".into()).redacted(), "redis://h:1");
}

#[test]
fn seed_accounts_never_debug_keys() {
    let c = Config::parse(DEMO_CONFIG, "demo.yaml").unwrap();
    assert!(!format!("{c:?}").contains("demo-free-key"));
}

#[test]
fn secrets_never_debug_their_values() {
    let s = Secrets(vec!["hunter2hunter2hunter2hunter2hunter2".into()]);
    assert_eq!(format!("{s:?}"), "<1 redacted>");
}

#[test]
fn merged_secrets_are_trimmed_and_name_the_variable_read() {
    let listed = [" a ".to_owned(), " ".to_owned(), "b".to_owned()];
    let m = secrets::merge(&listed, None, "TOLLGATE_TEST_NEVER_SET_SECRETS");
    assert_eq!(m.env, "TOLLGATE_TEST_NEVER_SET_SECRETS", "the default when no *_env key is given");
    assert_eq!(m.secrets.0, ["a", "b"]);
    assert_eq!(m.from_env, 0);
    let m = secrets::merge(&listed, Some("TOLLGATE_TEST_NEVER_SET_OTHER"), "TOLLGATE_TEST_NEVER_SET_SECRETS");
    assert_eq!(m.env, "TOLLGATE_TEST_NEVER_SET_OTHER", "the *_env key wins over the default");
}
