//! Builds the WebAssembly plugins (the `plugins/` workspace) for wasm32-wasip2 with
//! the normal build: no manual step. The built-in plugins are embedded in the binary;
//! every plugin's path is handed to the code (and the tests) as an env constant.

use std::path::PathBuf;
use std::process::Command;

/// Every plugin crate whose component the router or the tests use. `test-*` ones are
/// only handed over as paths (not embedded).
const PLUGINS: &[&str] = &[
    "hash-citus",
    "hash-pg-partition",
    "placement-default",
    "planner-fastpath",
    "planner-router",
    "planner-pushdown",
    "test-misbehave",
    "test-hash-variant",
];

fn main() {
    let router = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = router.parent().expect("workspace root").to_path_buf();
    let plugins = root.join("plugins");
    println!("cargo:rerun-if-changed={}", plugins.display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    // A target directory of its own: the outer build holds the lock on target/<profile>.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags are for the host, not for wasm.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo to build the plugins");
    if !out.status.success() {
        panic!(
            "building the WebAssembly plugins failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for p in PLUGINS {
        let file = target_dir
            .join("wasm32-wasip2")
            .join("release")
            .join(format!("{}.wasm", p.replace('-', "_")));
        assert!(
            file.is_file(),
            "plugin {p} was not built at {}",
            file.display()
        );
        let var = format!("SHARDGATE_PLUGIN_{}", p.replace('-', "_").to_uppercase());
        println!("cargo:rustc-env={var}={}", file.display());
    }
}
