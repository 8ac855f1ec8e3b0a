//! wrk, the HTTP load generator of the Envoy bench: one run and its report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{KillOnDrop, tool, wait_child};

/// wrk, with the connection count of every run.
#[derive(Debug, Clone)]
pub struct Wrk {
    exe: PathBuf,
    connections: u32,
}

/// What one wrk run reports.
#[derive(Debug, Clone, Copy)]
pub struct WrkOutput {
    /// Requests per second.
    pub rps: f64,
    /// Median latency in ms.
    pub p50_ms: f64,
    /// 99th percentile latency in ms.
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: u64,
    /// Responses other than 2xx/3xx.
    pub non2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
}

impl Wrk {
    /// `WRK_BIN`, else `wrk` on PATH, else in `.tools/bin` (`scripts/tools.sh` installs it there).
    pub fn find(connections: u32) -> Self {
        Self { exe: tool("WRK_BIN", "wrk"), connections }
    }

    /// `wrk -t1 -c<connections> -d<secs>s --latency` with `headers`, its
    /// output saved in `out`; fails on more than 0.1% non-2xx or socket errors.
    pub async fn run(&self, url: &str, headers: &[&str], secs: u64, out: &Path) -> Result<WrkOutput, String> {
        let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["-t1", &format!("-c{}", self.connections), &format!("-d{secs}s"), "--latency"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let child = cmd
            .arg(url)
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("wrk: {e}"))?;
        let status = wait_child("wrk", &mut KillOnDrop(child), Duration::from_secs(secs + 20)).await?;
        let text = std::fs::read_to_string(out).unwrap_or_default();
        if !status.success() {
            return Err(format!("wrk failed: {text}"));
        }
        let r = parse(&text)?;
        if r.requests == 0 || r.non2xx * 1000 > r.requests || r.socket_errors * 1000 > r.requests {
            return Err(format!(
                "{} non-2xx responses and {} socket errors in {} requests (more than 0.1%):\n{text}",
                r.non2xx, r.socket_errors, r.requests
            ));
        }
        Ok(r)
    }
}

/// Reads wrk's `--latency` report.
pub fn parse(text: &str) -> Result<WrkOutput, String> {
    let missing = |what: &str| format!("cannot parse wrk output ({what}):\n{text}");
    let line = |prefix: &str| text.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(str::trim);
    let rps = line("Requests/sec:").and_then(|v| v.parse().ok()).ok_or_else(|| missing("Requests/sec"))?;
    // A percentile line of the latency distribution (`99%  850.00us`), in ms.
    let percentile = |p: &str| -> Result<f64, String> {
        let v = line(p).ok_or_else(|| missing(p))?;
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| missing(p))?);
        let scale = match unit {
            "us" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            _ => return Err(missing(p)),
        };
        Ok(num.parse::<f64>().map_err(|_| missing(p))? * scale)
    };
    let (p50_ms, p99_ms) = (percentile("50%")?, percentile("99%")?);
    let requests = text
        .lines()
        .find_map(|l| l.split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .ok_or_else(|| missing("requests in"))?;
    let non2xx = line("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let socket_errors = line("Socket errors:")
        .map(|v| v.split(',').filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(WrkOutput { rps, p50_ms, p99_ms, requests, non2xx, socket_errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_latency_report() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%    1.00ms\n     99%  850.00us\n  \
                    81234 requests in 10.00s, 9.1MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  \
                    Non-2xx or 3xx responses: 3\nRequests/sec:   8123.40\n";
        let r = parse(text).unwrap();
        assert_eq!((r.requests, r.non2xx, r.socket_errors), (81234, 3, 3));
        assert!((r.rps - 8123.4).abs() < 1e-9 && (r.p99_ms - 0.85).abs() < 1e-9);
        assert!((r.p50_ms - 1.0).abs() < 1e-9);
        assert!(parse("garbage").is_err());
    }
}
