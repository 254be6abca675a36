//! The `shardgate` binary, built inside the tests package so that tests can run the
//! router as a separate process (`CARGO_BIN_EXE_shardgate-under-test`) without
//! shelling out to cargo. Same entry point as `router/src/main.rs`.
fn main() -> std::process::ExitCode {
    shardgate::cli::main()
}
