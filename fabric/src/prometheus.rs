//! Writing the Prometheus text exposition format (version 0.0.4), shared by
//! every Splitvisor component that serves `/metrics` (the memory node, the
//! storage node, the VMM), so that all follow one set of conventions:
//!
//! - every name starts with `splitvisor_<component>_`;
//! - counters end in `_total`, units are in the name (`_bytes`, `_seconds`,
//!   `_pages`), gauges carry no `_total`;
//! - label values are escaped as the format requires.
//!
//! `promtool check metrics` (Debian's `prometheus` package) accepts what this
//! writes; the components' tests run it on a live scrape.

use std::fmt::Write as _;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// An exposition being written: families of samples under one name prefix.
pub struct Exposition {
    prefix: String,
    out: String,
}

impl Exposition {
    /// A new exposition whose names all start with `splitvisor_<component>_`.
    pub fn new(component: &str) -> Self {
        Exposition {
            prefix: format!("splitvisor_{component}_"),
            out: String::with_capacity(8192),
        }
    }

    /// Starts family `name` (without the prefix) with its help text.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(
            self.out,
            "# HELP {p}{name} {help}\n# TYPE {p}{name} {}",
            kind.as_str(),
            p = self.prefix
        );
        self
    }

    /// One sample of family `name` with `labels` (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let _ = write!(self.out, "{}{name}", self.prefix);
        write_labels(&mut self.out, labels);
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A whole family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// A histogram family: `buckets` are (upper bound, observations at or
    /// below it) in increasing order; the `+Inf` bucket is `count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) -> &mut Self {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        for &(le, n) in buckets {
            self.sample(&bucket, &[("le", &number(le))], n as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], count as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Why a metrics endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot serve metrics on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// An HTTP endpoint serving `GET /metrics` (a daemon's `--metrics ADDR`); its
/// thread is stopped and joined when this is dropped.
pub struct MetricsServer {
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` and serves `render()`'s text at `/metrics` (anything else
    /// is 404) from a thread of its own.
    pub fn serve(
        addr: &str,
        render: impl Fn() -> String + Send + 'static,
    ) -> Result<MetricsServer, ServeError> {
        let bind_err = |reason: String| ServeError::Bind {
            addr: addr.to_string(),
            reason,
        };
        let server = tiny_http::Server::http(addr).map_err(|e| bind_err(e.to_string()))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| bind_err("not an IP address".into()))?;
        let server = std::sync::Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    let get = *req.method() == tiny_http::Method::Get;
                    let resp = if get && req.url().split('?').next() == Some("/metrics") {
                        let header =
                            tiny_http::Header::from_bytes(&b"Content-Type"[..], CONTENT_TYPE)
                                .expect("static header is valid");
                        tiny_http::Response::from_string(render()).with_header(header)
                    } else {
                        tiny_http::Response::from_string("not found; try GET /metrics\n")
                            .with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| bind_err(e.to_string()))?;
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            addr: bound,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out.push('}');
}

/// A sample value as the format writes it (integers without a fraction).
fn number(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_labels_and_histograms_are_written_as_the_format_says() {
        let mut e = Exposition::new("test");
        e.single("pages", Kind::Gauge, "Pages.\nTwo lines.", 3.0);
        e.family("reads_total", Kind::Counter, "Reads.").sample(
            "reads_total",
            &[("node", "a\"b\\c")],
            7.0,
        );
        e.histogram(
            "fetch_seconds",
            "Latency.",
            &[(0.001, 2), (0.01, 5)],
            0.0125,
            6,
        );
        let t = e.finish();
        assert!(
            t.contains("# HELP splitvisor_test_pages Pages.\\nTwo lines.\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE splitvisor_test_pages gauge\nsplitvisor_test_pages 3\n"));
        assert!(
            t.contains("splitvisor_test_reads_total{node=\"a\\\"b\\\\c\"} 7\n"),
            "{t}"
        );
        assert!(
            t.contains("splitvisor_test_fetch_seconds_bucket{le=\"0.001\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("splitvisor_test_fetch_seconds_bucket{le=\"+Inf\"} 6\n"));
        assert!(t.contains("splitvisor_test_fetch_seconds_sum 0.0125\n"));
        assert!(t.contains("splitvisor_test_fetch_seconds_count 6\n"));
    }
}
