//! CPU time from `/proc` (Linux): per process, of reaped children, of the
//! whole machine. The benches report CPU per request with these, so that a
//! figure holds up on a shared, noisy machine where wall-clock rates swing.

use std::collections::HashSet;
use std::process::Command;
use std::sync::OnceLock;

/// The fields of `/proc/<pid>/stat` after `(comm) `, so that index 0 is the
/// state letter (field 3 of proc(5)): utime is index 11, stime 12, cutime 13,
/// cstime 14.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(") ")?.1.split(' ').map(str::to_owned).collect())
}

fn field(fields: &[String], i: usize) -> u64 {
    fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// User + system ticks a process has used so far; `None` once it is gone or a zombie.
pub fn ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(&pid.to_string())?;
    if f.first().map(String::as_str) == Some("Z") {
        return None;
    }
    Some(field(&f, 11) + field(&f, 12))
}

/// User + system ticks of this process's reaped children (e.g. finished wrk runs).
pub fn reaped_children_ticks() -> u64 {
    stat_fields("self").map_or(0, |f| field(&f, 13) + field(&f, 14))
}

/// The machine's busy (user, nice, system, irq, softirq, steal) and total ticks.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// Ids of this process's live children.
pub fn child_pids() -> HashSet<u32> {
    let me = std::process::id().to_string();
    let mut out = HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Some(f) = stat_fields(&pid.to_string()) else { continue };
        if f.get(1) == Some(&me) && f.first().map(String::as_str) != Some("Z") {
            out.insert(pid);
        }
    }
    out
}

/// Ticks per second (`getconf CLK_TCK`, asked once; 100 when it cannot be asked).
pub fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100)
    })
}

/// This process's CPU seconds so far; NaN off Linux.
pub fn process_cpu_seconds() -> f64 {
    match stat_fields("self") {
        Some(f) => (field(&f, 11) + field(&f, 12)) as f64 / clock_ticks() as f64,
        None => f64::NAN,
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` writes them.
pub fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split(' ').take(3).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_counted_and_a_missing_one_is_none() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(ticks(std::process::id()).is_some());
        assert!(process_cpu_seconds() > 0.0);
        assert_eq!(ticks(u32::MAX), None);
        let (busy, total) = machine_ticks();
        assert!(busy > 0 && total >= busy);
    }
}
