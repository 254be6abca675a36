//! Prometheus metrics of one router, and the HTTP endpoint that serves them.
//! Names follow `shardgate_<subsystem>_<what>_<unit>`; label values come from small
//! fixed sets (node names from the config, protocol, SQLSTATE class), never SQL text.

mod http;

pub use http::serve_metrics;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntGauge,
    pub client_connections_total: IntCounter,
    pub client_auth_failures: IntCounter,
    pub pool_connections: IntGaugeVec,
    pub pool_wait_seconds: HistogramVec,
    pub backend_connects: IntCounterVec,
    pub backend_discards: IntCounterVec,
    pub statements: IntCounterVec,
    pub statement_seconds: HistogramVec,
    pub errors: IntCounterVec,
    pub cancel_requests: IntCounter,
    /// Shards copied to another node for a read joining tables that are not colocated.
    pub pulled_shards: IntCounter,
    /// Shards read by statements that read every shard (the pushdown tier's concat).
    pub fanout_shards: IntCounter,
    /// Routed simple queries run as statements prepared on the node (literals bound).
    pub statements_promoted: IntCounter,
    /// Client statements closed on backend connections beyond `max_prepared_statements`.
    pub statements_evicted: IntCounter,
    /// Label-resolved handles for the per-request hot path.
    pub statements_simple: IntCounter,
    pub statements_extended: IntCounter,
    pub request_seconds_simple: prometheus::Histogram,
    pub request_seconds_extended: prometheus::Histogram,
}

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by
    // the unit test below, never something a client can cause.
    r.expect("static metric definition")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let client_connections = must(IntGauge::new(
            "shardgate_frontend_client_connections",
            "Client connections currently open",
        ));
        let client_connections_total = must(IntCounter::new(
            "shardgate_frontend_client_connections_total",
            "Client connections accepted",
        ));
        let client_auth_failures = must(IntCounter::new(
            "shardgate_frontend_auth_failures_total",
            "Client logins refused",
        ));
        let pool_connections = must(IntGaugeVec::new(
            Opts::new(
                "shardgate_pool_backend_connections",
                "Backend connections by node and state (idle in the pool, or active: lent to a session)",
            ),
            &["node", "state"],
        ));
        let pool_wait_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "shardgate_pool_wait_seconds",
                "Time sessions waited for a backend connection when none was free",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["node"],
        ));
        let backend_connects = must(IntCounterVec::new(
            Opts::new(
                "shardgate_pool_backend_connects_total",
                "Backend connections opened",
            ),
            &["node"],
        ));
        let backend_discards = must(IntCounterVec::new(
            Opts::new(
                "shardgate_pool_backend_discards_total",
                "Backend connections closed because their state was unknown (client gone mid-transaction, broken connection)",
            ),
            &["node"],
        ));
        let statements = must(IntCounterVec::new(
            Opts::new(
                "shardgate_session_statements_total",
                "Statements run (simple Query messages and extended Execute messages)",
            ),
            &["protocol"],
        ));
        let statement_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "shardgate_session_request_duration_seconds",
                "Time from a client's request (Query, or Sync/Flush of an extended batch) to the end of the answer",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
            &["protocol"],
        ));
        let errors = must(IntCounterVec::new(
            Opts::new(
                "shardgate_session_errors_total",
                "Errors sent to clients, by SQLSTATE class (first two characters)",
            ),
            &["class"],
        ));
        let cancel_requests = must(IntCounter::new(
            "shardgate_frontend_cancel_requests_total",
            "CancelRequests received",
        ));
        let pulled_shards = must(IntCounter::new(
            "shardgate_session_pulled_shards_total",
            "Shards copied to the node running a read that joins tables which are not colocated (their shards on different nodes)",
        ));
        let fanout_shards = must(IntCounter::new(
            "shardgate_session_fanout_shards_total",
            "Shard reads of statements that read every shard of a table (their rows put together for the client)",
        ));
        let statements_promoted = must(IntCounter::new(
            "shardgate_session_promoted_statements_total",
            "Routed simple queries run as statements prepared on the node, their numeric literals bound as parameters",
        ));
        let statements_evicted = must(IntCounter::new(
            "shardgate_backend_prepared_evictions_total",
            "Client prepared statements closed on a backend connection that held more than max_prepared_statements (least recently used first); prepared again when next used",
        ));
        for c in [
            Box::new(pulled_shards.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(statements_promoted.clone()),
            Box::new(statements_evicted.clone()),
            Box::new(fanout_shards.clone()),
            Box::new(client_connections.clone()),
            Box::new(client_connections_total.clone()),
            Box::new(client_auth_failures.clone()),
            Box::new(pool_connections.clone()),
            Box::new(pool_wait_seconds.clone()),
            Box::new(backend_connects.clone()),
            Box::new(backend_discards.clone()),
            Box::new(statements.clone()),
            Box::new(statement_seconds.clone()),
            Box::new(errors.clone()),
            Box::new(cancel_requests.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            statements_simple: statements.with_label_values(&["simple"]),
            statements_extended: statements.with_label_values(&["extended"]),
            request_seconds_simple: statement_seconds.with_label_values(&["simple"]),
            request_seconds_extended: statement_seconds.with_label_values(&["extended"]),
            registry,
            client_connections,
            client_connections_total,
            client_auth_failures,
            pool_connections,
            pool_wait_seconds,
            backend_connects,
            backend_discards,
            statements,
            statement_seconds,
            errors,
            cancel_requests,
            pulled_shards,
            fanout_shards,
            statements_promoted,
            statements_evicted,
        }
    }

    /// Counts an error sent to a client by its SQLSTATE class.
    pub fn error(&self, sqlstate: &[u8]) {
        let class = match sqlstate.get(..2).and_then(|c| std::str::from_utf8(c).ok()) {
            Some(c) if c.bytes().all(|b| b.is_ascii_alphanumeric()) => c,
            _ => "??",
        };
        self.errors.with_label_values(&[class]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_all_families() {
        let m = super::Metrics::new();
        m.statements.with_label_values(&["simple"]).inc();
        m.error(b"42P01");
        m.error(b"\xff");
        let text = m.render();
        assert!(text.contains("shardgate_session_statements_total{protocol=\"simple\"} 1"));
        assert!(text.contains("shardgate_session_errors_total{class=\"42\"} 1"));
        assert!(text.contains("class=\"??\""));
    }
}
