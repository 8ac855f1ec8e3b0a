//! A real nginx in front of tollgate's HTTP door: the process, run with the
//! shipped `deploy/nginx/tollgate.conf` rewritten for the test's ports inside
//! a main config of its own (prefix, pid, temp paths in a temporary folder).
//! nginx's binary comes from `NGINX_BIN`, else `PATH`, else `.tools/bin`
//! (`scripts/test.sh` installs it from Debian's packages).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub use crate::http::{Response, request};
use crate::process::{free_addr, temp_dir, tool};

/// The nginx binary (see the module doc).
pub fn nginx_bin() -> PathBuf {
    tool("NGINX_BIN", "nginx")
}

/// `deploy/nginx/tollgate.conf` with its upstreams pointed at tollgate's HTTP
/// door and `upstream`, listening on `listen` (loopback).
pub fn config(door: SocketAddr, upstream: SocketAddr, listen: SocketAddr) -> String {
    let shipped = std::fs::read_to_string(crate::repo_root().join("deploy/nginx/tollgate.conf")).unwrap();
    let mut c = shipped;
    for (from, to) in [
        ("server tollgate.tollgate.svc.cluster.local:9192;", format!("server {door};")),
        ("server api.default.svc.cluster.local:8080;", format!("server {upstream};")),
        ("listen 80;", format!("listen {listen};")),
    ] {
        assert!(c.contains(from), "deploy/nginx/tollgate.conf no longer has `{from}`");
        c = c.replace(from, &to);
    }
    c
}

/// An nginx process (one worker, in the foreground); killed on drop.
pub struct Nginx {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx on a free loopback port with the server config made by
    /// `config_for(listen)` (what goes inside `http { }`, e.g. [`config`]),
    /// and waits until it accepts connections.
    pub async fn start(config_for: impl FnOnce(SocketAddr) -> String) -> Self {
        let dir = temp_dir("nginx");
        let addr = free_addr();
        let conf = write_config(&dir, &config_for(addr));
        let d = dir.display();
        let child = Command::new(nginx_bin())
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}:\n{}", nginx.log());
            }
            if TcpStream::connect(addr).await.is_ok() {
                return nginx;
            }
            assert!(Instant::now() < deadline, "nginx did not start:\n{}", nginx.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What nginx logged so far (warnings and up).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Sends a request through nginx.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.addr, method, path, headers)
            .await
            .unwrap_or_else(|e| panic!("request through nginx: {e}\n{}", self.log()))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `server` (what goes inside `http { }`) and a main config around it
/// (one worker in the foreground; pid, logs and temp paths in `dir`) into
/// `dir`; returns the main config's path.
fn write_config(dir: &Path, server: &str) -> PathBuf {
    std::fs::write(dir.join("tollgate.conf"), server).unwrap();
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
         include {d}/tollgate.conf;\n}}\n"
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, main).unwrap();
    conf
}

/// Runs `nginx -t` on a server config (what goes inside `http { }`); `Err` carries nginx's output.
pub fn validate(server: &str) -> Result<(), String> {
    let dir = temp_dir("nginx-t");
    let conf = write_config(&dir, server);
    let d = dir.display();
    let out = Command::new(nginx_bin())
        .args(["-t", "-q", "-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c"])
        .arg(conf)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() { Ok(()) } else { Err(format!("{}{log}", String::from_utf8_lossy(&out.stderr))) }
}
