//! The route table: which feature and meter a request touches.
//!
//! Pure data and matching; depends on nothing of ours. First match wins, as
//! in Envoy's own route tables, so operators read it top to bottom.

use std::sync::Arc;

/// How a route recognises a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Path must start with this.
    pub path_prefix: Option<String>,
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
        Self { index, matcher, public, feature, meter, cost, name }
    }

    fn describe(m: &RouteMatch) -> String {
        let path = m
            .path
            .clone()
            .or_else(|| m.path_prefix.as_ref().map(|p| format!("{p}*")))
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
    /// Path without query string or fragment.
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
}

/// The path Envoy sends, without `?query` and `#fragment`: routes match on the path alone.
pub fn path_only(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

fn strip_port(host: &str) -> &str {
    // `[::1]:8080` keeps its brackets; `example.com:8080` loses the port.
    if let Some(rest) = host.strip_prefix('[') {
        return rest.find(']').map_or(host, |i| &host[..i + 2]);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(index: usize, matcher: RouteMatch) -> Route {
        Route::new(index, matcher, false, None, None, 1)
    }

    fn key<'a>(path: &'a str, method: &'a str, host: &'a str) -> RouteKey<'a> {
        RouteKey { path, method, host }
    }

    #[test]
    fn first_match_wins_and_methods_hosts_filter() {
        let table = RouteTable::new(vec![
            route(0, RouteMatch { path: Some("/v1/search/admin".into()), ..Default::default() }),
            route(
                1,
                RouteMatch {
                    path_prefix: Some("/v1/search".into()),
                    methods: vec!["GET".into()],
                    ..Default::default()
                },
            ),
            route(
                2,
                RouteMatch {
                    path_prefix: Some("/".into()),
                    host: Some("api.example.com".into()),
                    ..Default::default()
                },
            ),
        ]);
        let idx = |k: RouteKey<'_>| table.find(&k).map(|r| r.index);
        assert_eq!(idx(key("/v1/search/admin", "GET", "x")), Some(0));
        assert_eq!(idx(key(path_only("/v1/search?q=1"), "get", "x")), Some(1));
        assert_eq!(idx(key("/v1/search", "POST", "x")), None);
        assert_eq!(idx(key("/v1/search", "POST", "API.example.com:8443")), Some(2));
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(path_only("/a/b?x=1#f"), "/a/b");
        assert_eq!(path_only("/a#f?x"), "/a");
        assert_eq!(path_only(""), "");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
