//! `cargo bench -p shardgate --bench plugin_call`: a distribution hash through the Wasm
//! plugin (hash-citus, pooled instance, deadline and memory cap armed per call) against
//! the same hash in native Rust, per value. Target (DESIGN.md): plugin call < 0.3 µs.

use shardgate::plugin::{Limits, PluginHost, Value, builtin};
use std::hint::black_box;
use std::time::Instant;

fn per_op(label: &str, iters: u32, mut f: impl FnMut(u32)) -> f64 {
    // Warm up, then take the best of 5 runs (the machine is shared and noisy).
    for i in 0..iters / 10 {
        f(i);
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    println!("{label:<44} {best:>9.1} ns/op");
    best
}

fn main() {
    // A long deadline: a stall of this shared machine must not fail a measurement.
    let limits = Limits {
        call_timeout: std::time::Duration::from_secs(10),
        ..Limits::default()
    };
    let host = PluginHost::new(None, limits.clone()).expect("plugin host");
    // As the router runs it: with per-plugin metrics (every call counted, 1 in 8 timed).
    let metered_host = PluginHost::new(None, limits)
        .expect("plugin host")
        .with_metrics(std::sync::Arc::new(
            shardgate::plugin::PluginMetrics::new(&prometheus::Registry::new()).expect("metrics"),
        ));
    let metered = metered_host
        .load_distribution_bytes("hash-citus", builtin::HASH_CITUS)
        .expect("hash-citus loads");
    let plugin = host
        .load_distribution_bytes("hash-citus", builtin::HASH_CITUS)
        .expect("hash-citus loads");
    let text = "tenant-000000042";
    let native_int = per_op("native hashint8", 5_000_000, |i| {
        black_box(pg_hash::hashint8(black_box(i as i64 * 7919)));
    });
    let plugin_int = per_op("plugin hash-citus int8 (call + hash)", 500_000, |i| {
        black_box(
            plugin
                .hash(&Value::Int8(black_box(i as i64 * 7919)))
                .expect("hash"),
        );
    });
    let metered_int = per_op("plugin hash-citus int8, with metrics", 500_000, |i| {
        black_box(
            metered
                .hash(&Value::Int8(black_box(i as i64 * 7919)))
                .expect("hash"),
        );
    });
    let native_text = per_op("native hashtext (16 bytes)", 5_000_000, |_| {
        black_box(pg_hash::hashtext(black_box(text)));
    });
    let plugin_text = per_op("plugin hash-citus text (16 bytes)", 500_000, |_| {
        black_box(
            plugin
                .hash(&Value::Text(black_box(text).to_owned()))
                .expect("hash"),
        );
    });
    println!(
        "call overhead: int8 {:.1} ns, text {:.1} ns (plugin minus native); metrics add {:.1} ns",
        plugin_int - native_int,
        plugin_text - native_text,
        metered_int - plugin_int
    );
}
