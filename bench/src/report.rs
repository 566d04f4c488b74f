//! Results: latency summaries from HdrHistograms, one run's result, medians
//! over runs, and the table and JSON they are printed as.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram records, in microseconds (10 minutes).
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// A new latency histogram: microseconds, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    #[allow(clippy::unwrap_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap()
}

/// Records `us` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A broker's resource use over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Resources {
    /// User + system CPU seconds of the broker process during the measured
    /// window.
    pub broker_cpu_s: f64,
    /// Highest resident set size of the broker seen during the run, MiB.
    pub broker_peak_rss_mib: f64,
    /// CPU seconds of the bench process itself (the clients) in the window.
    pub client_cpu_s: f64,
}

/// Backlog mode: fill, (restart), drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Backlog {
    pub messages: u64,
    pub fill_rate: f64,
    pub fill_s: f64,
    /// Broker RSS once the backlog is in, MiB.
    pub rss_after_fill_mib: f64,
    /// Highest broker RSS during the fill, MiB.
    pub peak_rss_fill_mib: f64,
    /// Restart to ready, seconds (when asked for).
    pub restart_s: Option<f64>,
    pub rss_after_restart_mib: Option<f64>,
    pub drain_rate: f64,
    pub drain_s: f64,
    /// Highest broker RSS during the drain, MiB.
    pub peak_rss_drain_mib: f64,
}

/// One run of one workload against one broker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub broker: String,
    /// Messages confirmed per second in the measured window.
    pub publish_rate: f64,
    /// Messages consumed (and acked) per second in the measured window.
    pub consume_rate: f64,
    pub published: u64,
    pub consumed: u64,
    /// Messages the broker refused (nacked / rejected).
    pub nacked: u64,
    /// Messages published but never consumed before the drain timeout.
    pub lost: u64,
    pub window_s: f64,
    pub end_to_end: Latency,
    pub confirm: Latency,
    pub resources: Resources,
    pub backlog: Option<Backlog>,
}

/// Median of `values` (mean of the middle two for an even count); 0 when
/// empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The numbers a comparison table shows for one broker, as medians over runs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub publish_rate: f64,
    pub consume_rate: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_p999_ms: f64,
    pub e2e_max_ms: f64,
    pub confirm_p50_ms: f64,
    pub confirm_p99_ms: f64,
    pub broker_cpu_s: f64,
    pub broker_peak_rss_mib: f64,
    pub lost: f64,
    pub backlog_rss_after_fill_mib: Option<f64>,
    pub backlog_restart_s: Option<f64>,
    pub backlog_fill_rate: Option<f64>,
    pub backlog_drain_rate: Option<f64>,
}

impl Summary {
    pub fn of(runs: &[RunResult]) -> Summary {
        let m = |f: &dyn Fn(&RunResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let mb = |f: &dyn Fn(&Backlog) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(|r| r.backlog.as_ref().and_then(f)).collect();
            if v.is_empty() { None } else { Some(median(&v)) }
        };
        Summary {
            runs: runs.len(),
            publish_rate: m(&|r| r.publish_rate),
            consume_rate: m(&|r| r.consume_rate),
            e2e_p50_ms: m(&|r| r.end_to_end.p50_ms),
            e2e_p99_ms: m(&|r| r.end_to_end.p99_ms),
            e2e_p999_ms: m(&|r| r.end_to_end.p999_ms),
            e2e_max_ms: m(&|r| r.end_to_end.max_ms),
            confirm_p50_ms: m(&|r| r.confirm.p50_ms),
            confirm_p99_ms: m(&|r| r.confirm.p99_ms),
            broker_cpu_s: m(&|r| r.resources.broker_cpu_s),
            broker_peak_rss_mib: m(&|r| r.resources.broker_peak_rss_mib),
            lost: m(&|r| r.lost as f64),
            backlog_rss_after_fill_mib: mb(&|b| Some(b.rss_after_fill_mib)),
            backlog_restart_s: mb(&|b| b.restart_s),
            backlog_fill_rate: mb(&|b| Some(b.fill_rate)),
            backlog_drain_rate: mb(&|b| Some(b.drain_rate)),
        }
    }
}

/// `a / b`, or NaN when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

/// A plain-text table with right-aligned columns after the first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<w$}", w = width[i]));
            } else {
                s.push_str(&format!("  {c:>w$}", w = width[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    out.push_str(&line(width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Formats a number with a sensible precision for a table.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One run as a human-readable block.
pub fn render_run(r: &RunResult) -> String {
    let mut rows = vec![
        vec!["publish rate (msg/s)".into(), fmt_num(r.publish_rate)],
        vec!["consume rate (msg/s)".into(), fmt_num(r.consume_rate)],
        vec!["published / consumed".into(), format!("{} / {}", r.published, r.consumed)],
        vec!["nacked / lost".into(), format!("{} / {}", r.nacked, r.lost)],
    ];
    for (name, l) in [("end-to-end", &r.end_to_end), ("confirm", &r.confirm)] {
        rows.push(vec![
            format!("{name} p50/p90/p99/p99.9/max (ms)"),
            format!(
                "{} / {} / {} / {} / {}",
                fmt_num(l.p50_ms),
                fmt_num(l.p90_ms),
                fmt_num(l.p99_ms),
                fmt_num(l.p999_ms),
                fmt_num(l.max_ms)
            ),
        ]);
    }
    rows.push(vec!["broker CPU (s)".into(), fmt_num(r.resources.broker_cpu_s)]);
    rows.push(vec!["broker peak RSS (MiB)".into(), fmt_num(r.resources.broker_peak_rss_mib)]);
    rows.push(vec!["client CPU (s)".into(), fmt_num(r.resources.client_cpu_s)]);
    if let Some(b) = &r.backlog {
        rows.push(vec!["backlog fill (msg/s, s)".into(), format!("{} in {}", fmt_num(b.fill_rate), fmt_num(b.fill_s))]);
        rows.push(vec![
            "backlog RSS after fill / peak (MiB)".into(),
            format!("{} / {}", fmt_num(b.rss_after_fill_mib), fmt_num(b.peak_rss_fill_mib)),
        ]);
        if let Some(s) = b.restart_s {
            rows.push(vec!["restart to ready (s)".into(), fmt_num(s)]);
        }
        rows.push(vec!["backlog drain (msg/s, s)".into(), format!("{} in {}", fmt_num(b.drain_rate), fmt_num(b.drain_s))]);
        rows.push(vec!["backlog peak RSS during drain (MiB)".into(), fmt_num(b.peak_rss_drain_mib)]);
    }
    format!("{} ({:.1}s window)\n{}", r.broker, r.window_s, table(&["metric", "value"], &rows))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_report_percentiles_in_milliseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            record(&mut h, us * 1000); // 1 ms .. 1000 ms
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 1000);
        let near = |a: f64, b: f64| (a - b).abs() / b < 0.01;
        assert!(near(l.p50_ms, 500.0), "{l:?}");
        assert!(near(l.p90_ms, 900.0), "{l:?}");
        assert!(near(l.p99_ms, 990.0), "{l:?}");
        assert!(near(l.p999_ms, 999.0), "{l:?}");
        assert!(near(l.max_ms, 1000.0), "{l:?}");
        assert_eq!(Latency::from_histogram(&latency_histogram()), Latency::default());
    }

    #[test]
    fn should_clamp_out_of_range_latencies() {
        let mut h = latency_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 1);
    }

    #[test]
    fn should_take_medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(ratio(6.0, 2.0), 3.0);
        assert!(ratio(1.0, 0.0).is_nan());
    }

    #[test]
    fn should_summarize_runs_by_median() {
        let run = |rate: f64, p99: f64| RunResult {
            broker: "warren".into(),
            consume_rate: rate,
            end_to_end: Latency { p99_ms: p99, ..Latency::default() },
            ..RunResult::default()
        };
        let s = Summary::of(&[run(10.0, 5.0), run(30.0, 1.0), run(20.0, 3.0)]);
        assert_eq!((s.runs, s.consume_rate, s.e2e_p99_ms), (3, 20.0, 3.0));
        assert_eq!(s.backlog_restart_s, None);
    }

    #[test]
    fn should_serialize_a_run_with_every_section() {
        let r = RunResult {
            broker: "rabbitmq".into(),
            backlog: Some(Backlog { restart_s: Some(1.5), ..Backlog::default() }),
            ..RunResult::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in ["broker", "publish_rate", "consume_rate", "end_to_end", "confirm", "resources", "backlog"] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        for key in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(v["end_to_end"].get(key).is_some(), "missing end_to_end.{key}");
        }
        assert!(v["resources"].get("broker_cpu_s").is_some());
        assert!(v["resources"].get("broker_peak_rss_mib").is_some());
        assert_eq!(v["backlog"]["restart_s"], 1.5);
    }

    #[test]
    fn should_align_table_columns() {
        let t = table(&["name", "rate"], &[vec!["a".into(), "10".into()], vec!["bbb".into(), "2000".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "name  rate");
        assert_eq!(lines[2], "a       10");
        assert_eq!(lines[3], "bbb   2000");
    }
}
