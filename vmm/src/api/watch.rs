//! `vmm stats --watch`: a live view of a running VM in a terminal, redrawn
//! every second from the API (`GET /vm`, `/stats`, `/memnodes`, `/metrics`):
//! rates over the last interval, the remote fetch latency histogram as bars,
//! and each memory node's state and pages. It fits the terminal's width.
//! [`render`] is a pure function of two samples, so it is tested without a VM.

use serde_json::Value;

/// One sample of everything the view shows.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// `GET /vm`.
    pub vm: Value,
    /// `GET /stats`.
    pub stats: Value,
    /// `GET /memnodes`.
    pub nodes: Value,
    /// `GET /events`.
    pub events: Value,
    /// `GET /metrics` (for the latency histogram's buckets).
    pub metrics: String,
}

impl Sample {
    /// Reads a sample from the API socket; `None` once the VM is gone.
    pub fn read(sock: &std::path::Path) -> Option<Sample> {
        let json = |path: &str| match super::request(sock, "GET", path) {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        let metrics = match super::request_text(sock, "GET", "/metrics", None) {
            Ok((200, t)) => t,
            _ => return None,
        };
        Some(Sample {
            vm: json("/vm")?,
            stats: json("/stats")?,
            nodes: json("/memnodes")?,
            events: json("/events")?,
            metrics,
        })
    }
}

/// The terminal's width in columns (80 if it is not a terminal).
pub fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own, or fails.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col >= 40 {
        ws.ws_col as usize
    } else {
        80
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Cumulative histogram buckets `(upper bound in s, count)` of a metric.
fn buckets(metrics: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn duration_label(s: f64) -> String {
    if s.is_infinite() {
        "more".into()
    } else if s < 1e-3 {
        format!("{:.0}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0}ms", s * 1e3)
    } else {
        format!("{s:.0}s")
    }
}

/// The view of the interval from `prev` to `cur` (`secs` long), `width`
/// columns wide.
pub fn render(prev: &Sample, cur: &Sample, secs: f64, width: usize) -> String {
    let width = width.max(40);
    let secs = secs.max(1e-3);
    let rate = |k: &str| n(&cur.stats, k).saturating_sub(n(&prev.stats, k)) as f64 / secs;
    let mut out = String::new();
    let info = &cur.vm["info"];
    out.push_str(&format!(
        "vm {:#x}  {}  {} vCPU(s)  {} MiB RAM, {} MiB cache  up {:.0} s\n",
        info["id"].as_u64().unwrap_or(0),
        cur.vm["state"].as_str().unwrap_or("?"),
        info["vcpus"].as_u64().unwrap_or(0),
        info["mem_bytes"].as_u64().unwrap_or(0) >> 20,
        info["local_cache_bytes"].as_u64().unwrap_or(0) >> 20,
        cur.vm["uptime_s"].as_f64().unwrap_or(0.0),
    ));
    let (res, budget) = (
        n(&cur.stats, "resident_pages"),
        n(&cur.stats, "budget_pages"),
    );
    let bar_w = width.saturating_sub(30).min(60);
    let filled = (res as usize * bar_w)
        .checked_div(budget as usize)
        .unwrap_or(0)
        .min(bar_w);
    out.push_str(&format!(
        "cache [{}{}] {res}/{budget} pages\n\n",
        "#".repeat(filled),
        ".".repeat(bar_w - filled)
    ));
    out.push_str(&format!(
        "per second: faults {:.0} remote, {:.0} zero | prefetched {:.0} | evicted {:.0} clean, {:.0} dirty | written back {:.1} MiB\n",
        rate("faults_remote"),
        rate("faults_zero"),
        rate("prefetch_remote") + rate("prefetch_zero"),
        rate("evict_clean"),
        rate("evict_dirty"),
        rate("writeback_bytes") / (1 << 20) as f64,
    ));
    out.push_str(&format!(
        "remote fetch: p50 {:.1} us, p99 {:.1} us over {} fetches; pages refused {}\n\n",
        cur.stats["fetch_p50_us"].as_f64().unwrap_or(0.0),
        cur.stats["fetch_p99_us"].as_f64().unwrap_or(0.0),
        n(&cur.stats, "fetch_count"),
        n(&cur.stats, "pages_refused"),
    ));
    if n(&cur.stats, "replicas") > 1 || n(&cur.stats, "node_failures") > 0 {
        out.push_str(&format!(
            "replicas {}: {} pages below, {} with no copy | re-replicating {:.0} pages/s (limit {}), {} copies made | {} node failure(s)\n\n",
            n(&cur.stats, "replicas"),
            n(&cur.stats, "pages_below_replicas"),
            n(&cur.stats, "pages_without_copy"),
            rate("rereplicated"),
            n(&cur.stats, "rereplicate_rate"),
            n(&cur.stats, "rereplicated"),
            n(&cur.stats, "node_failures"),
        ));
    }
    // The interval's fetches per latency bucket.
    let name = "splitvisor_vmm_fetch_latency_seconds";
    let (now, before) = (buckets(&cur.metrics, name), buckets(&prev.metrics, name));
    let mut last = (0u64, 0u64);
    let per_bucket: Vec<(String, u64)> = now
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|x| x.0 == le).map_or(0, |x| x.1);
            let (dc, db) = (c - last.0.min(c), b - last.1.min(b));
            last = (c, b);
            (format!("<= {}", duration_label(le)), dc.saturating_sub(db))
        })
        .collect();
    let most = per_bucket.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let hist_w = width.saturating_sub(24);
    out.push_str("fetch latency, this interval:\n");
    for (label, c) in per_bucket.iter().filter(|b| b.1 > 0) {
        let w = (*c as usize * hist_w).div_ceil(most as usize).min(hist_w);
        out.push_str(&format!("  {label:>8} {:<w$} {c}\n", "*".repeat(w), w = w));
    }
    out.push_str("\nmemory nodes:\n");
    for node in cur.nodes.as_array().into_iter().flatten() {
        let mut line = format!(
            "  {:<22} {:<9} {:>10} pages{}",
            node["addr"].as_str().unwrap_or("?"),
            node["state"].as_str().unwrap_or("?"),
            node["pages"].as_u64().unwrap_or(0),
            if node["full"].as_bool().unwrap_or(false) {
                "  full"
            } else {
                ""
            }
        );
        if let Some(z) = node["zone"].as_str() {
            line.push_str(&format!("  zone {z}"));
        }
        if let Some(e) = node["detach_error"].as_str() {
            line.push_str(&format!("  detach failed: {e}"));
        }
        if let Some(e) = node["failure"].as_str() {
            line.push_str(&format!("  {e}"));
        }
        line.truncate(width);
        out.push_str(&line);
        out.push('\n');
    }
    // The last few node events, with how long ago they were.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let events: Vec<&Value> = cur.events.as_array().into_iter().flatten().collect();
    if !events.is_empty() {
        out.push_str("\nnode events:\n");
        for e in events.iter().rev().take(4).rev() {
            out.push_str(&format!(
                "  {:>7.1} s ago  {} {} {}\n",
                (now - e["time"].as_f64().unwrap_or(now)).max(0.0),
                e["addr"].as_str().unwrap_or("?"),
                e["event"].as_str().unwrap_or("?"),
                e["detail"].as_str().unwrap_or(""),
            ));
        }
    }
    out.lines()
        .map(|l| l.chars().take(width).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(faults: u64, le_1ms: u64, total: u64) -> Sample {
        Sample {
            vm: json!({"info": {"id": 7, "vcpus": 2, "mem_bytes": 1u64 << 30, "local_cache_bytes": 64u64 << 20}, "state": "running", "uptime_s": 3.0}),
            stats: json!({"resident_pages": 100, "budget_pages": 200, "faults_remote": faults, "fetch_p50_us": 30.0,
                          "replicas": 2, "pages_below_replicas": 40, "rereplicated": faults * 3, "rereplicate_rate": 25600, "node_failures": 1}),
            nodes: json!([{"addr": "10.0.0.1:7000", "state": "active", "pages": 5, "full": false},
                          {"addr": "10.0.0.2:7000", "state": "draining", "pages": 1, "full": true},
                          {"addr": "10.0.0.3:7000", "state": "dead", "pages": 0, "full": false, "zone": "rack-b",
                           "failure": "memory node 10.0.0.3:7000 failed: connection lost"}]),
            events: json!([{"time": 1.0, "addr": "10.0.0.3:7000", "event": "failed", "detail": "connection lost"}]),
            metrics: format!(
                "splitvisor_vmm_fetch_latency_seconds_bucket{{le=\"0.0001\"}} {le_1ms}\n\
                 splitvisor_vmm_fetch_latency_seconds_bucket{{le=\"0.001\"}} {le_1ms}\n\
                 splitvisor_vmm_fetch_latency_seconds_bucket{{le=\"+Inf\"}} {total}\n"
            ),
        }
    }

    #[test]
    fn the_view_shows_rates_the_histogram_and_nodes_within_the_width() {
        let (a, b) = (sample(10, 5, 5), sample(210, 105, 107));
        for width in [40, 80, 200] {
            let v = render(&a, &b, 2.0, width);
            assert!(v.lines().all(|l| l.chars().count() <= width), "{v}");
            assert!(v.contains("vm 0x7"), "{v}");
        }
        let v = render(&a, &b, 2.0, 120);
        assert!(v.contains("faults 100 remote"), "{v}");
        assert!(v.contains("<= 100us") && v.contains(" 100\n"), "{v}");
        assert!(v.contains("<= more") && v.contains(" 2\n"), "{v}");
        assert!(
            v.contains("10.0.0.2:7000") && v.contains("draining") && v.contains("full"),
            "{v}"
        );
        assert!(v.contains("cache [") && v.contains("100/200 pages"), "{v}");
        assert!(
            v.contains("replicas 2: 40 pages below") && v.contains("re-replicating 300 pages/s"),
            "{v}"
        );
        assert!(v.contains("dead") && v.contains("zone rack-b"), "{v}");
        assert!(
            v.contains("node events:") && v.contains("10.0.0.3:7000 failed"),
            "{v}"
        );
    }
}
