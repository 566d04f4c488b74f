//! A process's CPU time and memory, from `/proc` (Linux only).

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, 100 when unknown).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds from the text of `/proc/<pid>/stat`.
pub fn parse_cpu_seconds(stat: &str, ticks: f64) -> Option<f64> {
    // The command name (field 2) may contain spaces: fields after it start
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of `/proc/<pid>/status`, in MiB.
pub fn parse_status_mib(status: &str, field: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds used so far by `pid` (its threads included).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_seconds(&stat, clock_ticks())
}

/// Current resident set size of `pid`, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    parse_status_mib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS:")
}

/// Peak resident set size of `pid` since start or the last
/// [`reset_peak_rss`], MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    parse_status_mib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmHWM:")
}

/// Resets the kernel's peak-RSS mark of `pid` (needs the right to write
/// `/proc/<pid>/clear_refs`; silently does nothing otherwise).
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The pid of the running RabbitMQ node (the `beam.smp` process).
pub fn find_process(comm: &str) -> Option<u32> {
    let mut found: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect();
    found.sort_unstable();
    found.first().copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_parse_cpu_from_stat_with_spaces_in_name() {
        let stat = "1234 (beam smp (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 30 0 100 1000 200";
        assert_eq!(parse_cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(parse_cpu_seconds("garbage", 100.0), None);
    }

    #[test]
    fn should_parse_status_fields_in_mib() {
        let status = "Name:\tx\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(parse_status_mib(status, "VmRSS:"), Some(100.0));
        assert_eq!(parse_status_mib(status, "VmHWM:"), Some(200.0));
        assert_eq!(parse_status_mib(status, "VmSwap:"), None);
    }

    #[test]
    fn should_read_our_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_mib(me).unwrap() > 0.0);
    }
}
