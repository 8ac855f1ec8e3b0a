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
            RouteMatch { path_prefix: Some("/v1/search".into()), methods: vec!["GET".into()], ..Default::default() },
        ),
        route(
            2,
            RouteMatch { path_prefix: Some("/".into()), host: Some("api.example.com".into()), ..Default::default() },
        ),
    ]);
    let idx = |k: RouteKey<'_>| table.find(&k).map(|r| r.index);
    assert_eq!(idx(key("/v1/search/admin", "GET", "x")), Some(0));
    assert_eq!(idx(key(path_only("/v1/search?q=1"), "get", "x")), Some(1));
    assert_eq!(idx(key("/v1/search", "POST", "x")), None);
    assert_eq!(idx(key("/v1/search", "POST", "API.example.com:8443")), Some(2));
}

#[test]
fn normal_paths_pass() {
    for p in [
        "/",
        "/v1/ai/chat",
        "/v1/ai/",
        "/a%20b",
        "/a%25b",
        "/a%2520",
        "/a%3Bb",
        "/v1/ai;jsessionid=1/chat",
        "/x-y_z~.a",
    ] {
        assert_eq!(check_path(p), Ok(()), "{p}");
    }
}

#[test]
fn every_confusable_path_is_refused() {
    use PathError::*;
    let cases: &[(&str, Result<(), PathError>)] = &[
        ("", Err(NotAbsolute)),
        ("v1/ai", Err(NotAbsolute)),
        ("/public/../v1/ai/chat", Err(DotSegment)),
        ("/public/./v1", Err(DotSegment)),
        ("/public/..", Err(DotSegment)),
        ("/public/..;/v1/ai/chat", Err(DotSegment)),
        ("/public/.;x/v1", Err(DotSegment)),
        ("/public/%2e%2e/v1/ai/chat", Err(EncodedCharacter)),
        ("/public/%2E%2E/v1/ai/chat", Err(EncodedCharacter)),
        ("/public%2f..%2fv1%2fai%2fchat", Err(EncodedCharacter)),
        ("/public%2F..%2Fv1", Err(EncodedCharacter)),
        ("/public/..%5cv1/ai", Err(EncodedCharacter)),
        ("/v1/%61i/chat", Err(EncodedCharacter)),
        ("/v1/ai%00.json", Err(EncodedCharacter)),
        ("/public/%252e%252e/v1/ai/chat", Err(EncodedCharacter)),
        ("/public%252fv1", Err(EncodedCharacter)),
        ("/a%2541", Err(EncodedCharacter)),
        ("/public/..\\v1/ai", Err(Backslash)),
        ("/public#/../v1/ai", Err(Fragment)),
        ("//v1/ai/chat", Err(EmptySegment)),
        ("/public//v1", Err(EmptySegment)),
        ("/v1/;x/ai", Err(EmptySegment)),
        ("/v1/ai;x", Ok(())),
        ("/a%2", Err(BadPercent)),
        ("/a%zz", Err(BadPercent)),
        ("/a b", Err(Unencoded)),
        ("/a\tb", Err(Unencoded)),
        ("/caf\u{e9}", Err(Unencoded)),
    ];
    for (p, want) in cases {
        assert_eq!(check_path(p), *want, "{p:?}");
    }
    assert_eq!(check_path(&format!("/{}", "a".repeat(MAX_PATH_BYTES))), Err(TooLong));
}

#[test]
fn prefixes_match_whole_segments() {
    let table = RouteTable::new(vec![
        route(0, RouteMatch { path_prefix: Some("/public".into()), ..Default::default() }),
        route(1, RouteMatch { path_prefix: Some("/v1/search".into()), ..Default::default() }),
        route(2, RouteMatch { string_prefix: Some("/legacy".into()), ..Default::default() }),
        route(3, RouteMatch { path_prefix: Some("/v2/".into()), ..Default::default() }),
    ]);
    let idx = |p: &str| table.find(&key(&match_form(p), "GET", "h")).map(|r| r.index);
    assert_eq!(idx("/public"), Some(0));
    assert_eq!(idx("/public/x"), Some(0));
    assert_eq!(idx("/publicity"), None);
    assert_eq!(idx("/v1/search"), Some(1));
    assert_eq!(idx("/v1/searchX"), None);
    assert_eq!(idx("/v1/search;jsessionid=1/x"), Some(1), "parameters do not hide a segment");
    assert_eq!(idx("/public;x"), Some(0));
    assert_eq!(idx("/legacyX"), Some(2), "string_prefix keeps the plain string match");
    assert_eq!(idx("/v2/anything"), Some(3));
    assert_eq!(idx("/v2"), None);
}

#[test]
fn shadowed_routes_are_found() {
    let m = |prefix: &str, methods: &[&str]| RouteMatch {
        path_prefix: Some(prefix.into()),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let table = RouteTable::new(vec![
        route(0, m("/v1", &["GET"])),
        route(1, m("/v1/search", &["GET"])),
        route(2, m("/v1/search", &[])),
        route(3, m("/v1x", &[])),
        route(4, RouteMatch { path: Some("/v1/search/x".into()), ..Default::default() }),
        route(5, m("/", &[])),
        route(6, m("/anything", &["POST"])),
    ]);
    assert_eq!(table.shadowed(), vec![(1, 0), (4, 2), (6, 5)]);
}

#[test]
fn resolve_models_a_permissive_upstream() {
    assert_eq!(resolve("/public/../v1/ai/chat"), "/v1/ai/chat");
    assert_eq!(resolve("/public/%2e%2e/v1/ai/chat"), "/v1/ai/chat");
    assert_eq!(resolve("/public%2f..%2fv1%2fai%2fchat"), "/v1/ai/chat");
    assert_eq!(resolve("/public/..%5cv1/ai"), "/v1/ai");
    assert_eq!(resolve("/public/..;/v1/ai/chat"), "/v1/ai/chat");
    assert_eq!(resolve("//v1//ai/"), "/v1/ai/");
    assert_eq!(resolve("/v1/%61i"), "/v1/ai");
    assert_eq!(resolve("/"), "/");
    assert_eq!(resolve("/%4%41"), "/J", "decoded until nothing changes (found by the path fuzz target)");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

    /// Resolving twice is resolving once.
    #[test]
    fn resolve_is_idempotent(p in "/[a-z./;%25cfe2\\\\#]{0,24}") {
        let once = resolve(&p);
        proptest::prop_assert_eq!(resolve(&once), once);
    }

    /// A path tollgate accepts is the path a permissive upstream serves,
    /// so the route tollgate matched is the route that is served.
    #[test]
    fn accepted_paths_are_what_the_upstream_serves(p in "/[a-z./;%25cfe2\\\\#]{0,24}") {
        if check_path(&p).is_ok() {
            proptest::prop_assert_eq!(resolve(&p), match_form(&p).into_owned());
        }
    }

    /// No accepted path reaches a paid route by resolution while being routed elsewhere.
    #[test]
    fn accepted_paths_never_reach_another_route(p in "/(public|v1|ai|\\.\\.|\\.|%2e|%2f|;x|/){0,8}") {
        let table = RouteTable::new(vec![
            route(0, RouteMatch { path_prefix: Some("/public".into()), ..Default::default() }),
            route(1, RouteMatch { path_prefix: Some("/v1/ai".into()), ..Default::default() }),
        ]);
        if check_path(&p).is_ok() {
            let routed = table.find(&key(&match_form(&p), "GET", "h")).map(|r| r.index);
            let served = table.find(&key(&resolve(&p), "GET", "h")).map(|r| r.index);
            proptest::prop_assert_eq!(routed, served);
        }
    }
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
    assert_eq!(strip_port("api.example.com."), "api.example.com", "a trailing dot names the same host");
    assert_eq!(strip_port("api.example.com.:443"), "api.example.com");
}
