//! Metrics of distributed transactions and of the deadlock detector.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, Registry};

pub struct TxnMetrics {
    pub commits: IntCounter,
    pub aborts: IntCounter,
    pub in_doubt: IntCounter,
    pub recovered_committed: IntCounter,
    pub recovered_rolled_back: IntCounter,
    pub recovery_seconds: Histogram,
    /// prepare, record, commit.
    pub phase_seconds: HistogramVec,
    pub prepare_seconds: Histogram,
    pub record_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub deadlocks_detected: IntCounter,
    pub deadlock_cancels: IntCounter,
    pub detector_seconds: Histogram,
}

impl TxnMetrics {
    pub fn new(registry: &Registry) -> Result<TxnMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let fast = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let histogram = |name: &str, help: &str| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(fast.clone()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "shardgate_2pc_phase_seconds",
                "Time in each step of a two-phase commit: prepare (PREPARE TRANSACTION on every writer), record (the commit records on the coordinator), commit (COMMIT PREPARED on every writer)",
            )
            .buckets(fast.clone()),
            &["phase"],
        )?;
        registry.register(Box::new(phase_seconds.clone()))?;
        Ok(TxnMetrics {
            commits: counter(
                "shardgate_2pc_commits_total",
                "Transactions that wrote on several nodes and committed with two-phase commit",
            )?,
            aborts: counter(
                "shardgate_2pc_aborts_total",
                "Two-phase commits rolled back (a PREPARE or the commit record failed)",
            )?,
            in_doubt: counter(
                "shardgate_2pc_in_doubt_total",
                "Two-phase commits whose commit record write had an unknown outcome (left to recovery)",
            )?,
            recovered_committed: counter(
                "shardgate_2pc_recovered_committed_total",
                "Prepared transactions that recovery committed (a commit record existed)",
            )?,
            recovered_rolled_back: counter(
                "shardgate_2pc_recovered_rolled_back_total",
                "Prepared transactions that recovery rolled back (no commit record)",
            )?,
            recovery_seconds: histogram(
                "shardgate_2pc_recovery_seconds",
                "Time of one recovery pass over every node",
            )?,
            prepare_seconds: phase_seconds.with_label_values(&["prepare"]),
            record_seconds: phase_seconds.with_label_values(&["record"]),
            commit_seconds: phase_seconds.with_label_values(&["commit"]),
            phase_seconds,
            deadlocks_detected: counter(
                "shardgate_deadlocks_detected_total",
                "Distributed deadlocks (wait-for cycles across nodes) found by the detector",
            )?,
            deadlock_cancels: counter(
                "shardgate_deadlock_cancellations_total",
                "Transactions cancelled to break a distributed deadlock",
            )?,
            detector_seconds: histogram(
                "shardgate_deadlock_detector_seconds",
                "Time of one deadlock detector run (collecting wait-for edges from every node and searching cycles)",
            )?,
        })
    }
}
