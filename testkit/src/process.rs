//! Child processes: finding the tools the harness runs, free loopback ports,
//! children killed on drop, and the real tollgate binary as operators run it
//! (a config file on free ports, started and waited for until ready).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::http_get;

/// Finds a tool the harness runs: `$env` when it is set, else `name` on
/// `PATH`, else in the repository's `.tools/bin` (where `scripts/test.sh`
/// installs what is missing). Panics, saying how to get it, when none has it.
pub fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let on_path =
        || std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()));
    let installed = || Some(crate::repo_root().join(".tools/bin").join(name)).filter(|p| p.is_file());
    on_path().or_else(installed).unwrap_or_else(|| {
        panic!("{name} not found: set {env}, put it on PATH, or run the suite with scripts/test.sh, which installs it")
    })
}

/// A free loopback address (bound, then released for a child to take).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A free loopback port (see [`free_addr`]).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// A fresh temporary directory named `tollgate-{what}-{pid}-{n}`; the caller removes it.
pub fn temp_dir(what: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tollgate-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` at most `within`, killing it when late; true when it exited successfully.
pub fn wait_bounded(child: &mut Child, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Polls tollgate's `/readyz` on `http` for `within`; true once it answers 200.
pub async fn becomes_ready(http: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok((200, _, _)) = http_get(http, "/readyz").await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A tollgate process on a config file; killed on drop, its folder removed.
pub struct TollgateProcess {
    /// The process; tests signal it (`kill -HUP`) and read its `/proc` status.
    pub child: Child,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address (`/readyz`, `/metrics`).
    pub http: SocketAddr,
    /// The config file, which tests may rewrite (reloads).
    pub file: PathBuf,
    dir: PathBuf,
}

impl TollgateProcess {
    /// Runs `bin` (the tollgate binary: a test's `env!("CARGO_BIN_EXE_tollgate")`)
    /// with `--config` on the YAML that `yaml` makes for the chosen gRPC and
    /// HTTP addresses, plus `args`; waits until `/readyz` answers 200 (bounded).
    pub async fn start(bin: &str, args: &[&str], yaml: impl Fn(SocketAddr, SocketAddr) -> String) -> Self {
        Self::start_env(bin, args, &[], yaml).await
    }

    /// Like [`TollgateProcess::start`], with `env` set for the process
    /// (secrets named by the config; `TOLLGATE_LOG` to keep more than errors in [`Self::log`]).
    pub async fn start_env(
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        yaml: impl Fn(SocketAddr, SocketAddr) -> String,
    ) -> Self {
        let (grpc, http) = (free_addr(), free_addr());
        let dir = temp_dir("proc");
        let file = dir.join("tollgate.yaml");
        std::fs::write(&file, yaml(grpc, http)).unwrap();
        let log = std::fs::File::create(dir.join("tollgate.log")).unwrap();
        let child = Command::new(bin)
            .args(["--config", file.to_str().unwrap()])
            .args(args)
            .env_remove("TOLLGATE_REDIS_URL")
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Self { child, grpc, http, file, dir };
        assert!(becomes_ready(p.http, Duration::from_secs(20)).await, "tollgate binary did not become ready");
        p
    }

    /// What the process logged so far (stderr; errors only unless `TOLLGATE_LOG` says more).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tollgate.log")).unwrap_or_default()
    }

    /// The folder holding [`Self::file`] (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&mut self) -> u64 {
        assert!(self.child.try_wait().unwrap().is_none(), "tollgate exited");
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc status");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
    }
}

impl Drop for TollgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for `child` at most `within` without blocking the runtime (a
/// signal can cancel the wait; the child dies with its guard).
pub async fn wait_child(
    what: &str,
    child: &mut KillOnDrop,
    within: Duration,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not finish within {}s", within.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
