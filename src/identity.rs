//! Who is calling: the configured identity sources, tried in order.
//!
//! Depends on nothing of ours. The transport (gRPC ext_authz, the internal
//! API) implements [`Credentials`] so that prost types never reach here.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// One way to find the caller, as configured under `identity:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// An API key in a header, optionally after an auth scheme (`Bearer <key>`).
    ApiKey {
        /// Lower-case header name; shared, so a response that strips it copies nothing.
        header: Arc<str>,
        /// Auth scheme that must prefix the value, compared case-insensitively.
        scheme: Option<String>,
    },
    /// An account id in a JWT claim that Envoy's `jwt_authn` filter verified and
    /// put into dynamic metadata.
    JwtClaim {
        /// Filter metadata namespace, e.g. `envoy.filters.http.jwt_authn`.
        namespace: String,
        /// Field under the namespace holding the payload (`payload_in_metadata`).
        field: String,
        /// Claim holding the account id; dots walk into nested objects.
        claim: String,
    },
    /// An account id in a header that a filter in front of us sets (never trust
    /// it unless that filter overwrites what clients send).
    TrustedHeader {
        /// Lower-case header name; shared like `ApiKey`'s.
        header: Arc<str>,
    },
}

/// Read access to the request's credentials, implemented by each transport.
pub trait Credentials {
    /// A request header by lower-case name, as Envoy's `headers` map carries
    /// it, so that every door reads a header the same way: a header sent more
    /// than once is its values joined by `,` (a repeated credential is judged
    /// whole, never by its first or last copy: no account id holds a `,`,
    /// and no key does unless one was made with it), bytes that are not
    /// UTF-8 replaced (by U+FFFD, not a key's or an id's character; Envoy's
    /// map uses `!`), so the header is still there to judge and remove.
    /// Borrowed when sent once, as UTF-8.
    fn header(&self, name: &str) -> Option<Cow<'_, str>>;
    /// A string claim from verified JWT metadata.
    fn claim(&self, namespace: &str, field: &str, claim: &str) -> Option<String>;
    /// The lower-case names of the request's headers starting with `prefix`
    /// as [`spelled_with_prefix`] reads them, each once (so forged
    /// `x-tollgate-*` headers can be removed, in every spelling an upstream
    /// reads as one, each checked against few names: a flood of them costs
    /// n); none by default. Borrowed when the name is lower-case already (as
    /// Envoy sends them).
    fn headers_with_prefix(&self, _prefix: &str) -> Vec<Cow<'_, str>> {
        Vec::new()
    }
}

/// Whether header `name` starts with `prefix` as an upstream may read it:
/// any case, and `_` for any `-` (CGI-style upstreams, Rack, WSGI, PHP,
/// read `x_tollgate-plan` as `x-tollgate-plan`). Bytes, not `str` slicing:
/// a multi-byte character at the cut would panic.
pub fn spelled_with_prefix(name: &[u8], prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.iter().zip(prefix.as_bytes()).all(|(&n, &p)| n.eq_ignore_ascii_case(&p) || (p == b'-' && n == b'_'))
}

/// The copies of a header sent more than once as one value, joined by `,`
/// as Envoy's `headers` map joins them; `None` when it was not sent.
/// Borrowed when sent once.
pub fn joined<'a>(mut sent: impl Iterator<Item = Cow<'a, str>>) -> Option<Cow<'a, str>> {
    let first = sent.next()?;
    Some(sent.fold(first, |mut all, v| {
        let s = all.to_mut();
        s.push(',');
        s.push_str(&v);
        all
    }))
}

/// The longest API key looked up; longer values are invalid without a lookup.
pub const MAX_KEY_BYTES: usize = 256;

/// Whether `key` can be an API key: 1–[`MAX_KEY_BYTES`] visible ASCII
/// characters. Checked before hashing or any cache or store lookup.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && key.bytes().all(|b| b.is_ascii_graphic())
}

/// What the caller presented, before the store is asked about it: borrowed
/// from the request (and the config) wherever it can be.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No configured source found anything.
    Nothing,
    /// An API key, to be looked up by its hash.
    ApiKey {
        /// The header that carried it: removed before the upstream.
        header: Cow<'a, str>,
        /// The secret itself; never logged (see the `Debug` impl).
        key: Cow<'a, str>,
    },
    /// An account id from a verified claim or a trusted header.
    Account(Cow<'a, str>),
}

impl fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Presented::Nothing => f.write_str("Nothing"),
            Presented::ApiKey { header, .. } => write!(f, "ApiKey {{ header: {header:?}, key: <redacted> }}"),
            Presented::Account(id) => f.debug_tuple("Account").field(id).finish(),
        }
    }
}

impl IdentitySource {
    /// Whether this source takes the account id on the caller's word (a JWT
    /// claim or a header someone in front of tollgate is trusted to set),
    /// rather than proving it with a secret tollgate checks itself.
    pub fn is_asserted(&self) -> bool {
        !matches!(self, IdentitySource::ApiKey { .. })
    }
}

/// Tries `sources` in order; the first that yields a credential decides, so an
/// invalid API key is never rescued by a later source. Asserted sources (JWT
/// claims, trusted headers) are skipped unless the caller is `trusted`: anyone
/// who can reach the gRPC port can forge JWT metadata or any header.
pub fn identify<'a>(sources: &'a [IdentitySource], creds: &'a impl Credentials, trusted: bool) -> Presented<'a> {
    for source in sources {
        if source.is_asserted() && !trusted {
            continue;
        }
        match source {
            IdentitySource::ApiKey { header, scheme } => {
                let Some(value) = creds.header(header) else { continue };
                let key = match scheme {
                    Some(scheme) => sub(value, |v| strip_scheme(v, scheme)),
                    None => sub(value, |v| Some(v.trim())),
                };
                if let Some(key) = key.filter(|k| !k.is_empty()) {
                    return Presented::ApiKey { header: Cow::Borrowed(header), key };
                }
            }
            IdentitySource::JwtClaim { namespace, field, claim } => {
                if let Some(id) = creds.claim(namespace, field, claim).filter(|id| !id.is_empty()) {
                    return Presented::Account(Cow::Owned(id));
                }
            }
            IdentitySource::TrustedHeader { header } => {
                if let Some(id) =
                    creds.header(header).and_then(|v| sub(v, |v| Some(v.trim()))).filter(|id| !id.is_empty())
                {
                    return Presented::Account(id);
                }
            }
        }
    }
    Presented::Nothing
}

/// The configured credential headers this request carries (an API-key header
/// in its scheme, a trusted header): removed before the upstream on every
/// route, public ones included, whichever of them identified the caller.
/// The config's own names, in `sources`' order (a name may come twice).
pub fn credential_headers<'s>(
    sources: &'s [IdentitySource],
    creds: &'s impl Credentials,
) -> impl Iterator<Item = &'s Arc<str>> {
    sources.iter().filter_map(|source| match source {
        IdentitySource::ApiKey { header, scheme } => match (creds.header(header), scheme) {
            (Some(v), Some(scheme)) if strip_scheme(&v, scheme).is_some() => Some(header),
            (Some(_), None) => Some(header),
            _ => None,
        },
        IdentitySource::TrustedHeader { header } if creds.header(header).is_some() => Some(header),
        _ => None,
    })
}

/// The key in `value` when it carries `scheme`: what follows the scheme (and
/// a space or tab) when the value starts with it; the whole value, trimmed
/// (`Basic x,Bearer y`: not a key, as it holds a space, unless only the
/// scheme ends it) when a later one of its comma-separated parts does, as
/// when `Basic x` and `Bearer y` came as two headers. Either way the header is
/// ours: judged, and removed before the upstream. No token of the schemes
/// this is for (`Bearer`, `Basic`) holds a comma.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    const SPACE: [char; 2] = [' ', '\t'];
    let carries =
        |part: &str| part.trim_start().split_once(SPACE).is_some_and(|(got, _)| got.eq_ignore_ascii_case(scheme));
    match value.trim_start().split_once(SPACE) {
        Some((got, rest)) if got.eq_ignore_ascii_case(scheme) => Some(rest.trim()),
        _ => value.split(',').skip(1).any(carries).then(|| value.trim()),
    }
}

/// `cut` of `value`, borrowed when `value` is.
fn sub<'a>(value: Cow<'a, str>, cut: impl Fn(&str) -> Option<&str>) -> Option<Cow<'a, str>> {
    match value {
        Cow::Borrowed(v) => cut(v).map(Cow::Borrowed),
        Cow::Owned(v) => cut(&v).map(|k| Cow::Owned(k.to_owned())),
    }
}

/// What is kept of an API key besides its hash: enough to recognise it in a
/// list, never enough to use it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyMeta {
    /// The first characters of the key (`tg_3f9a1c…`), as shown to operators.
    pub prefix: String,
    /// A label given at creation.
    #[serde(default)]
    pub name: String,
    /// When the key was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl KeyMeta {
    /// Metadata for `key`, showing its first `shown` characters.
    pub fn for_key(key: &str, shown: usize, name: &str, created_at: chrono::DateTime<chrono::Utc>) -> Self {
        let prefix: String = key.chars().take(shown).collect();
        Self { prefix: format!("{prefix}…"), name: name.to_owned(), created_at }
    }
}

/// The SHA-256 of an API key: the only form in which keys are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Parses the lower-case hex form (a key's id in the API).
    pub fn from_hex(s: &str) -> Option<Self> {
        hex::decode(s).ok()?.try_into().ok().map(KeyHash)
    }

    /// Hashes a presented or newly created key.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Lower-case hex, as stored in Redis keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Req {
        headers: HashMap<&'static str, &'static str>,
        claims: HashMap<&'static str, &'static str>,
    }

    impl Credentials for Req {
        fn header(&self, name: &str) -> Option<Cow<'_, str>> {
            self.headers.get(name).copied().map(Cow::Borrowed)
        }
        fn claim(&self, _ns: &str, _field: &str, claim: &str) -> Option<String> {
            self.claims.get(claim).map(|s| s.to_string())
        }
    }

    fn sources() -> Vec<IdentitySource> {
        vec![
            IdentitySource::ApiKey { header: "x-api-key".into(), scheme: None },
            IdentitySource::ApiKey { header: "authorization".into(), scheme: Some("Bearer".into()) },
            IdentitySource::JwtClaim { namespace: "jwt".into(), field: "payload".into(), claim: "org_id".into() },
            IdentitySource::TrustedHeader { header: "x-account-id".into() },
        ]
    }

    fn req(headers: &[(&'static str, &'static str)], claims: &[(&'static str, &'static str)]) -> Req {
        Req { headers: headers.iter().copied().collect(), claims: claims.iter().copied().collect() }
    }

    #[test]
    fn sources_are_tried_in_order() {
        let s = sources();
        let key = |h: &'static str, k: &'static str| Presented::ApiKey { header: h.into(), key: k.into() };
        fn identify<'a>(s: &'a [IdentitySource], r: &'a Req) -> Presented<'a> {
            super::identify(s, r, true)
        }
        assert_eq!(identify(&s, &req(&[], &[])), Presented::Nothing);
        assert_eq!(identify(&s, &req(&[("x-api-key", " k1 ")], &[])), key("x-api-key", "k1"));
        assert_eq!(
            identify(&s, &req(&[("authorization", "bearer  k2"), ("x-account-id", "a")], &[])),
            key("authorization", "k2")
        );
        assert_eq!(
            identify(&s, &req(&[("authorization", "Basic Zm9v"), ("x-account-id", "a")], &[("org_id", "o")])),
            Presented::Account("o".into()),
            "a foreign scheme is not ours; the next source applies"
        );
        assert_eq!(identify(&s, &req(&[("x-account-id", "a")], &[])), Presented::Account("a".into()));
        assert_eq!(identify(&s, &req(&[("x-api-key", "")], &[])), Presented::Nothing);
        assert_eq!(identify(&s, &req(&[("authorization", "Bearer\tk3")], &[])), key("authorization", "k3"), "a tab");
    }

    /// A value as Envoy joins a header sent twice is judged whole: an
    /// `authorization` carrying the scheme in any copy is ours (never
    /// skipped as a foreign scheme), and none of these is a valid key or id.
    #[test]
    fn a_header_sent_twice_is_judged_whole() {
        let s = sources();
        let key = |h: &'static str, k: &'static str| Presented::ApiKey { header: h.into(), key: k.into() };
        for (headers, presented) in [
            (&[("x-api-key", "k1,k2")][..], key("x-api-key", "k1,k2")),
            (&[("authorization", "Bearer k1,Bearer k2")], key("authorization", "k1,Bearer k2")),
            (&[("authorization", "Basic Zm9v,Bearer k2")], key("authorization", "Basic Zm9v,Bearer k2")),
            (
                &[("authorization", "Basic Zm9v, bearer k2"), ("x-account-id", "a")],
                key("authorization", "Basic Zm9v, bearer k2"),
            ),
            (&[("x-account-id", "a,b")], Presented::Account("a,b".into())),
            (&[("authorization", "Basic Zm9v,Bearer\tk2")], key("authorization", "Basic Zm9v,Bearer\tk2")),
        ] {
            let r = req(headers, &[]);
            assert_eq!(identify(&s, &r, true), presented, "{headers:?}");
            assert_eq!(credential_headers(&s, &r).count(), headers.len(), "{headers:?}: removed");
            let valid = match &presented {
                Presented::ApiKey { key, .. } => is_valid_key(key) && !key.contains(','),
                Presented::Account(id) => crate::entitlement::is_valid_account_id(id),
                Presented::Nothing => true,
            };
            assert!(!valid, "{headers:?}");
        }
        let basic = req(&[("authorization", "Basic Zm9v,Basic YmFy")], &[]);
        assert_eq!(identify(&s, &basic, true), Presented::Nothing, "foreign in every copy: not ours");
        assert_eq!(credential_headers(&s, &basic).count(), 0, "left for the upstream's own auth");
    }

    #[test]
    fn own_names_are_found_in_every_spelling_an_upstream_reads_as_one() {
        for name in
            ["x-tollgate-plan", "X-Tollgate-Plan", "x_tollgate_plan", "x-tollgate_plan", "X_TOLLGATE-x", "x-tollgate-"]
        {
            assert!(spelled_with_prefix(name.as_bytes(), "x-tollgate-"), "{name}");
        }
        for name in ["x-tollgate", "x-tollgateplan", "y-tollgate-plan", "x--tollgate-", "x-tollgat\u{e9}-", ""] {
            assert!(!spelled_with_prefix(name.as_bytes(), "x-tollgate-"), "{name}");
        }
    }

    #[test]
    fn copies_are_joined_as_envoy_joins_them() {
        assert_eq!(joined(std::iter::empty()), None);
        assert!(matches!(joined([Cow::Borrowed("a")].into_iter()), Some(Cow::Borrowed("a"))));
        assert_eq!(joined(["a", "b", ""].map(Cow::Borrowed).into_iter()).as_deref(), Some("a,b,"));
    }

    #[test]
    fn asserted_sources_need_a_trusted_caller() {
        let s = sources();
        let r = req(&[("x-account-id", "a")], &[("org_id", "o")]);
        assert_eq!(identify(&s, &r, false), Presented::Nothing, "forged metadata and headers are ignored");
        assert_eq!(identify(&s, &r, true), Presented::Account("o".into()));
        let k = req(&[("x-api-key", "k")], &[]);
        assert_eq!(identify(&s, &k, false), Presented::ApiKey { header: "x-api-key".into(), key: "k".into() });
    }

    #[test]
    fn keys_are_bounded_before_lookup() {
        assert!(is_valid_key("tg_0123abcd"));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key(&"k".repeat(MAX_KEY_BYTES + 1)));
        assert!(!is_valid_key("has space"));
        assert!(!is_valid_key("caf\u{e9}"));
        assert!(!is_valid_key("nul\0"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let p = Presented::ApiKey { header: "x-api-key".into(), key: "sekret".into() };
        assert!(!format!("{p:?}").contains("sekret"));
        assert!(!format!("{:?}", KeyHash::of("sekret")).contains("sekret"));
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(KeyHash::of("abc").to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
