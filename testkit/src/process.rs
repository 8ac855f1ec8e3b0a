//! The real tollgate binary as operators run it: a config file on free
//! loopback ports, started and waited for until ready, killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http_get;

/// A free loopback address (bound, then released for the child to take).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A tollgate process on a config file; killed on drop, its folder removed.
pub struct TollgateProcess {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The config file, which tests may rewrite (reloads).
    pub file: PathBuf,
    dir: PathBuf,
}

impl TollgateProcess {
    /// Runs `bin` (the tollgate binary) with `--config` on the YAML that `yaml`
    /// makes for the chosen gRPC and HTTP addresses, plus `args`; waits until
    /// `/readyz` answers 200 (bounded).
    pub async fn start(bin: &str, args: &[&str], yaml: impl Fn(SocketAddr, SocketAddr) -> String) -> Self {
        let (grpc, http) = (free_addr(), free_addr());
        let dir = std::env::temp_dir().join(format!("tollgate-proc-{}-{}", std::process::id(), grpc.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tollgate.yaml");
        std::fs::write(&file, yaml(grpc, http)).unwrap();
        let child = Command::new(bin)
            .args(["--config", file.to_str().unwrap()])
            .args(args)
            .env_remove("TOLLGATE_REDIS_URL")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Self { child, grpc, http, file, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get(p.http, "/readyz").await.is_ok_and(|r| r.0 == 200) {
            assert!(Instant::now() < deadline, "tollgate binary did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
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
