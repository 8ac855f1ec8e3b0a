//! Real `redis-server` processes for tests and benches: each on an ephemeral
//! loopback port, without persistence, killed on drop; a three-master
//! cluster; `redis-cli MONITOR`; and `redis-benchmark` runs.
//!
//! The binaries: `TOLLGATE_REDIS_SERVER`, `TOLLGATE_REDIS_CLI` and
//! `TOLLGATE_REDIS_BENCHMARK` when set; else `redis-cli` and
//! `redis-benchmark` next to `$TOLLGATE_REDIS_SERVER`; else `PATH`; else
//! `.tools/bin`, where `scripts/test.sh` installs them when they are missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{KillOnDrop, free_port, temp_dir, tool, wait_bounded};

/// A Redis tool (see the module doc).
fn redis_tool(env: &str, name: &str) -> PathBuf {
    let sibling = || {
        let server = PathBuf::from(std::env::var_os("TOLLGATE_REDIS_SERVER")?);
        Some(server.parent()?.join(name)).filter(|p| p.is_file())
    };
    match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => sibling().unwrap_or_else(|| tool(env, name)),
    }
}

/// The `redis-server` binary (see the module doc).
pub fn server_bin() -> PathBuf {
    tool("TOLLGATE_REDIS_SERVER", "redis-server")
}

/// One redis-server.
pub struct RedisServer {
    /// Its loopback port; the same after [`RedisServer::restart`].
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    server: PathBuf,
    cli: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    pub fn start_with(extra: &[&str]) -> Self {
        let (server, cli) = (server_bin(), redis_tool("TOLLGATE_REDIS_CLI", "redis-cli"));
        for _ in 0..5 {
            let mut s = Self {
                port: free_port(),
                dir: temp_dir("redis"),
                args: extra.iter().map(|s| s.to_string()).collect(),
                server: server.clone(),
                cli: cli.clone(),
                child: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(&self.server)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).is_some_and(|o| o.trim() == "PONG") {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The redis-server binary this runs.
    pub fn binary(&self) -> &Path {
        &self.server
    }

    /// Its working folder (removed on drop), for files that go with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `redis-server --version`, first line.
    pub fn version(&self) -> String {
        let out = Command::new(&self.server).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).lines().next().unwrap_or("?").to_owned()
    }

    /// A `redis-cli` command aimed at this server, for callers that run it
    /// themselves (e.g. on another thread, as `DEBUG SLEEP` blocks).
    pub fn cli_command(&self) -> Command {
        let mut command = Command::new(&self.cli);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]).stdin(Stdio::null());
        command
    }

    /// Runs redis-cli against this server (at most 30 s); `None` if it fails or cannot connect.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut child = self
            .cli_command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-cli");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let ok = wait_bounded(&mut child, Duration::from_secs(30));
        let text = reader.join().unwrap_or_default();
        (ok && !text.starts_with("Could not connect")).then_some(text)
    }

    /// `INFO commandstats`: calls so far per command (lower-case names).
    pub fn commandstats(&self) -> HashMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// Calls of one command so far, from `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        self.commandstats().get(command).copied().unwrap_or(0)
    }

    /// redis-server's CPU seconds so far (user + sys, from `INFO cpu`).
    pub fn cpu_seconds(&self) -> f64 {
        self.cli(&["INFO", "cpu"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("used_cpu_user:").or_else(|| l.strip_prefix("used_cpu_sys:")))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    }

    /// Starts `redis-cli MONITOR`; [`Monitor::stop`] returns the commands clients sent
    /// (script-internal calls, which MONITOR tags `lua`, are left out).
    pub fn monitor(&self) -> Monitor {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let out = self.dir.join(format!("monitor-{n}.log"));
        let file = std::fs::File::create(&out).unwrap();
        let child =
            self.cli_command().arg("MONITOR").stdout(file).stderr(Stdio::null()).spawn().expect("spawn MONITOR");
        let monitor = Monitor { child: KillOnDrop(child), out };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&monitor.out).map(|s| !s.contains("OK")).unwrap_or(true) {
            assert!(Instant::now() < deadline, "MONITOR did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        monitor
    }

    /// Runs `redis-benchmark` with `command` (e.g. one `EVALSHA` as a client
    /// sent it) against this server; `None` when it fails or outlasts `run.deadline`.
    pub fn benchmark(&self, run: &Benchmark, command: &[String]) -> Option<BenchmarkResult> {
        let out_path = self.dir.join(format!("benchmark-c{}-P{}.csv", run.clients, run.pipeline));
        let out = std::fs::File::create(&out_path).expect("benchmark output");
        let (port, n, c, p) =
            (self.port.to_string(), run.requests.to_string(), run.clients.to_string(), run.pipeline.to_string());
        let mut child = Command::new(redis_tool("TOLLGATE_REDIS_BENCHMARK", "redis-benchmark"))
            .args(["-h", "127.0.0.1", "-p", &port, "-c", &c, "-n", &n, "-P", &p, "-q", "--csv"])
            .args(command)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-benchmark");
        let ok = wait_bounded(&mut child, run.deadline);
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        // CSV: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        let row = text.lines().rev().find(|l| !l.starts_with("\"test\"") && l.matches(',').count() >= 7)?;
        let fields: Vec<f64> =
            row.rsplit(',').take(7).map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
        // Reversed: max, p99, p95, p50, min, avg, rps.
        ok.then_some(BenchmarkResult { rps: fields[6], p50_ms: fields[3], p99_ms: fields[1] })
    }

    /// Kills the process (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (empty, as there is no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not come back on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters on loopback.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them, and waits for `cluster_state:ok`.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]))
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.push("--cluster-yes");
        let out = nodes[0].cli(&args).expect("redis-cli --cluster create");
        assert!(out.contains("All 16384 slots covered"), "cluster create said:\n{out}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not reach cluster_state:ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    /// `redis+cluster://host:port,...` over every master.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// A running `redis-cli MONITOR`, writing into a file; killed on drop.
pub struct Monitor {
    child: KillOnDrop,
    out: PathBuf,
}

impl Monitor {
    /// Stops monitoring; returns the lower-case command names clients sent.
    pub fn stop(self) -> Vec<String> {
        self.stop_commands().into_iter().map(|args| args[0].to_lowercase()).collect()
    }

    /// Stops monitoring; returns each command clients sent, as its arguments.
    pub fn stop_commands(self) -> Vec<Vec<String>> {
        std::thread::sleep(Duration::from_millis(300));
        drop(self.child);
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter(|l| !l.contains(" lua]"))
            .filter_map(|l| l.split_once("] ").map(|(_, rest)| monitor_args(rest)))
            .filter(|args| !args.is_empty())
            .collect()
    }
}

/// Splits a MONITOR line's `"ARG" "ARG" ...` into its arguments (undoing `\"`, `\\`, `\xHH`).
fn monitor_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut bytes = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        bytes.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
                    }
                    Some('n') => bytes.push(b'\n'),
                    Some('r') => bytes.push(b'\r'),
                    Some('t') => bytes.push(b'\t'),
                    Some(other) => bytes.extend(other.to_string().as_bytes()),
                    None => break,
                },
                other => bytes.extend(other.to_string().as_bytes()),
            }
        }
        args.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    args
}

/// One `redis-benchmark` run's settings.
#[derive(Clone, Debug)]
pub struct Benchmark {
    /// `-c`: parallel connections.
    pub clients: usize,
    /// `-n`: requests in all.
    pub requests: usize,
    /// `-P`: requests pipelined per connection.
    pub pipeline: usize,
    /// Upper bound on the run; a later one is killed and counts as failed.
    pub deadline: Duration,
}

/// One `redis-benchmark` result.
#[derive(Clone, Copy, Debug)]
pub struct BenchmarkResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th-percentile latency.
    pub p99_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::monitor_args;

    #[test]
    fn monitor_lines_split_into_unescaped_arguments() {
        let line = r#""EVALSHA" "ab\"c" "2" "tollgate:{acct}:q" "\x01\\n""#;
        assert_eq!(monitor_args(line), ["EVALSHA", "ab\"c", "2", "tollgate:{acct}:q", "\u{1}\\n"]);
    }
}
