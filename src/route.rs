//! The route table: which feature and meter a request touches.
//!
//! Pure data and matching; depends on nothing of ours but `x402`'s per-route settings. First match wins, as
//! in Envoy's own route tables, so operators read it top to bottom.
//!
//! Routes match the *normal form* of a path only ([`check_path`]): a path
//! an upstream could read as another one (`/public/../v1/ai`, `%2e%2e`,
//! `%2f`, `\`, `//`, `..;` for servlet containers, `%61` for `a`) is refused
//! before any route is looked at, because the upstream, not tollgate, decides
//! what it finally serves. Prefixes match whole segments: `/public` matches
//! `/public` and `/public/x`, never `/publicity`.

use std::borrow::Cow;
use std::sync::Arc;

/// The longest path (without query) tollgate decides on; longer ones are refused.
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path is not in normal form; each is answered 400 `request_invalid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty, or not starting with `/`.
    #[error("path must start with /")]
    NotAbsolute,
    /// Longer than [`MAX_PATH_BYTES`].
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    /// A `.` or `..` segment (also `..;x`, which servlet containers read as `..`).
    #[error("path has a dot segment")]
    DotSegment,
    /// `//`, or an empty segment before `;` (read as `//` once parameters are dropped).
    #[error("path has an empty segment")]
    EmptySegment,
    /// `%2e`, `%2f`, `%5c` or a percent-encoded unreserved character, which
    /// upstreams decode into a different path.
    #[error("path has a percent-encoded delimiter or unreserved character")]
    EncodedCharacter,
    /// `%` not followed by two hex digits.
    #[error("path has a malformed percent-encoding")]
    BadPercent,
    /// A backslash, which some upstreams read as `/`.
    #[error("path has a backslash")]
    Backslash,
    /// A `#`: fragments are never sent, so one here is an attempt to split the path.
    #[error("path has a fragment")]
    Fragment,
    /// A control character, space or non-ASCII byte (those must be percent-encoded).
    #[error("path has a byte that must be percent-encoded")]
    Unencoded,
}

/// Checks that `path` (without its query string) is in normal form: absolute,
/// no dot or empty segments, no encoded `.`, `/`, `\` or unreserved
/// characters, no raw `\`, `#`, controls, spaces or non-ASCII. A path in
/// normal form names one resource however an upstream resolves it; a
/// normalising proxy (Envoy with `normalize_path`, `merge_slashes` and escaped
/// slashes unescaped) only ever sends such paths.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            b'%' => {
                let Some(c) = hex_pair(bytes, i + 1) else { return Err(PathError::BadPercent) };
                // `%25` followed by a confusable escape is that escape encoded
                // twice (`%252e`): an upstream that decodes twice reads `.`.
                if is_confusable(c) || (c == b'%' && hex_pair(bytes, i + 3).is_some_and(is_confusable)) {
                    return Err(PathError::EncodedCharacter);
                }
                i += 3;
                continue;
            }
            b if !(0x21..=0x7e).contains(&b) => return Err(PathError::Unencoded),
            _ => {}
        }
        i += 1;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        // Servlet containers drop `;parameters` before resolving dot segments.
        let name = segment.split(';').next().unwrap_or("");
        if name == "." || name == ".." {
            return Err(PathError::DotSegment);
        }
        if name.is_empty() && (!last || segment.contains(';')) {
            return Err(PathError::EmptySegment);
        }
    }
    Ok(())
}

/// The path routes compare against: `;parameters` dropped from every segment,
/// so `/v1/ai;x/chat` is metered as `/v1/ai/chat`, as a servlet upstream serves it.
/// Borrows when there are none (the usual case).
pub fn match_form(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (n, segment) in path.split('/').enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    Cow::Owned(out)
}

/// The path the most permissive upstream would serve for `path`: `#...` cut,
/// `%XX` of unreserved characters, `/` and `\\` decoded, `\\` read as `/`,
/// `;parameters` dropped, slashes merged and dot segments resolved (RFC 3986
/// §5.2.4). tollgate never routes on this (it refuses what is not already in
/// normal form); tests and fuzzers use it as the model of an upstream:
/// for every path [`check_path`] accepts, `resolve(p) == match_form(p)`.
pub fn resolve(path: &str) -> String {
    let path = path.split('#').next().unwrap_or("");
    // Decoded until nothing changes (`%4%41` decodes to `%4A`, an escape of
    // its own). Each round that changes anything is shorter, so this ends.
    let mut decoded = path.as_bytes().to_vec();
    loop {
        let next = decode_unreserved(&decoded);
        if next == decoded {
            break;
        }
        decoded = next;
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, segment) in segments.iter().enumerate() {
        let name = segment.split(';').next().unwrap_or("");
        trailing = n == last && (name.is_empty() || name == "." || name == "..") && n > 0;
        match name {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            name => out.push(name),
        }
    }
    let mut r = format!("/{}", out.join("/"));
    if trailing && r != "/" {
        r.push('/');
    }
    r
}

/// Whether `c`, once decoded from `%XX`, would change the path an upstream
/// serves: an unreserved character (it has a literal form), `/`, `\\`, or a control.
fn is_confusable(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c) || c.is_ascii_control()
}

/// One round of decoding `%XX` of unreserved characters, `/` and `\\`.
fn decode_unreserved(bytes: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(c) = hex_pair(bytes, i + 1)
            && (c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c))
        {
            decoded.push(c);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    decoded
}

/// The byte `bytes[at..at + 2]` encodes in hex, if both are hex digits.
fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
    Some((hex(at)? * 16 + hex(at + 1)?) as u8)
}

/// Whether `path` lies under `prefix` segment by segment: equal, or continuing
/// with `/` (a prefix ending in `/` covers everything below it).
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

/// How a route recognises a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Path must be this or lie below it, segment by segment.
    pub path_prefix: Option<String>,
    /// Path must start with this string (not segment-aware: `/public` also
    /// matches `/publicity`); for configs that relied on that before.
    pub string_prefix: Option<String>,
    /// Path must equal this.
    pub path: Option<String>,
    /// Upper-case methods; empty matches any.
    pub methods: Vec<String>,
    /// Lower-case host without port; `None` matches any.
    pub host: Option<String>,
}

/// One entry of the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Position in the table, for logs (`routes[2]`).
    pub index: usize,
    /// What it matches.
    pub matcher: RouteMatch,
    /// Public routes pass without credentials or billing checks.
    pub public: bool,
    /// Feature the plan must include.
    pub feature: Option<String>,
    /// Meter whose quotas the request spends.
    pub meter: Option<String>,
    /// Units one request spends on the meter (and in credits on prepaid plans).
    pub cost: u64,
    /// The matcher as configured (`api.example.com/v1/search*`), made once for logs.
    pub name: Arc<str>,
    /// The response header that reports what a request really cost
    /// (`cost_from_response`); `cost` is then what a Check reserves.
    pub cost_from_response: Option<String>,
    /// The route's `shadow:` (wins over the plan's and the config's); `None` when it sets none.
    pub shadow: Option<bool>,
    /// The route's x402 price and whether callers without an account may pay (`x402:`).
    pub x402: Option<crate::x402::RouteX402>,
}

impl Route {
    /// A route named after its matcher.
    pub fn new(
        index: usize,
        matcher: RouteMatch,
        public: bool,
        feature: Option<String>,
        meter: Option<String>,
        cost: u64,
    ) -> Self {
        let name = Self::describe(&matcher).into();
        Self { index, matcher, public, feature, meter, cost, name, cost_from_response: None, shadow: None, x402: None }
    }

    fn describe(m: &RouteMatch) -> String {
        let path = m
            .path
            .clone()
            .or_else(|| m.path_prefix.as_ref().map(|p| format!("{p}*")))
            .or_else(|| m.string_prefix.as_ref().map(|p| format!("{p}**")))
            .unwrap_or_else(|| "*".to_owned());
        match &m.host {
            Some(h) => format!("{h}{path}"),
            None => path,
        }
    }
}

/// The request attributes routes match on.
#[derive(Debug, Clone, Copy)]
pub struct RouteKey<'a> {
    /// Path without query string, in normal form ([`check_path`]) and
    /// without `;parameters` ([`match_form`]).
    pub path: &'a str,
    /// Method as sent (compared case-insensitively).
    pub method: &'a str,
    /// Host or `:authority`, possibly with a port.
    pub host: &'a str,
}

impl RouteMatch {
    fn matches(&self, key: &RouteKey<'_>) -> bool {
        if let Some(p) = &self.path
            && key.path != p
        {
            return false;
        }
        if let Some(prefix) = &self.path_prefix
            && !under_prefix(key.path, prefix)
        {
            return false;
        }
        if let Some(prefix) = &self.string_prefix
            && !key.path.starts_with(prefix.as_str())
        {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(key.method)) {
            return false;
        }
        if let Some(host) = &self.host
            && !strip_port(key.host).eq_ignore_ascii_case(host)
        {
            return false;
        }
        true
    }
}

impl RouteMatch {
    /// Whether every request `other` matches is also matched by `self`, so a
    /// route with `other` placed after one with `self` can never be reached.
    pub fn covers(&self, other: &RouteMatch) -> bool {
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty() && other.methods.iter().all(|m| self.methods.contains(m)));
        let host = self.host.is_none() || self.host == other.host;
        // Every path `other` can match starts with this string and, when
        // `segment` is set, on a segment boundary.
        let (other_path, segment) = match (&other.path, &other.path_prefix, &other.string_prefix) {
            (Some(p), _, _) => (p.as_str(), true),
            (None, Some(p), _) => (p.as_str(), true),
            (None, None, Some(p)) => (p.as_str(), false),
            (None, None, None) => ("/", false),
        };
        let exact_other = other.path.is_some();
        let path = match (&self.path, &self.path_prefix, &self.string_prefix) {
            (Some(p), _, _) => exact_other && other.path.as_deref() == Some(p.as_str()),
            (None, Some(p), _) => p == "/" || (segment && under_prefix(other_path, p)),
            (None, None, Some(p)) => other_path.starts_with(p.as_str()),
            (None, None, None) => true,
        };
        methods && host && path
    }
}

/// Routes in config order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// A table that tries `routes` in order.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// The first route that matches, if any.
    pub fn find(&self, key: &RouteKey<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(key))
    }

    /// All routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// `(shadowed, by)` index pairs: routes an earlier route always matches
    /// first, so they never apply (`check-config` warns about each).
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (j, later) in self.routes.iter().enumerate() {
            if let Some(i) = self.routes[..j].iter().position(|earlier| earlier.matcher.covers(&later.matcher)) {
                out.push((j, i));
            }
        }
        out
    }
}

/// The path without `?query` and `#fragment`, for logs and tools. Not what
/// the authorizer routes on: it cuts only the query, so a `#` in a request
/// path reaches [`check_path`] and is refused (clients never send fragments).
pub fn path_only(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

fn strip_port(host: &str) -> &str {
    // `[::1]:8080` keeps its brackets; `example.com:8080` loses the port.
    if let Some(rest) = host.strip_prefix('[') {
        return rest.find(']').map_or(host, |i| &host[..i + 2]);
    }
    let host = match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    };
    // `api.example.com.` (fully qualified) is the same host to every upstream.
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests;
